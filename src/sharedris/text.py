"""BEiT-3 tokenizer: a SentencePiece model mapped to fairseq/XLM-R ids.

ids = ``[0] + [piece_id + 1, or 3 for the unknown piece] + [2]``, truncated to ``max_len`` keeping
the final 2, right-padded with 1. Built on ``sentencepiece`` directly (docs/reference.md explains why
not transformers).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MAX_TEXT_CHARS = 1000  # longer input is cut before tokenizing: the model reads at most text_len tokens anyway
_SPM_UNK = 0  # the unknown piece of an XLM-R style SentencePiece model


class Tokenizer:
    """Turn expressions into BEiT-3 token ids and a padding mask.

    Args:
        model_file: path of a SentencePiece model (``beit3.spm`` for the pretrained encoders).
        max_len: fixed output length L, including the begin and end tokens.
    """

    def __init__(self, model_file: str | Path, max_len: int = 40) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"tokenizer model {self.model_file} does not exist")
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (begin and end tokens), got {max_len}")
        self.max_len = max_len
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.model_file} is not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids this tokenizer can emit (pieces shifted by one, plus the 4 specials)."""
        return max(self.sp.get_piece_size() + 1, UNK_ID + 1)

    def encode(self, text: str) -> list[int]:
        """Ids of one expression, truncated to ``max_len`` (not padded)."""
        pieces = self.sp.encode(text, out_type=int)
        ids = [BOS_ID] + [p + 1 if p != _SPM_UNK else UNK_ID for p in pieces] + [EOS_ID]
        if len(ids) > self.max_len:
            ids = ids[: self.max_len - 1] + [EOS_ID]
        return ids

    def __call__(self, texts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Tokenize a batch.

        Args:
            texts: a list of expressions (a single string is a batch of one).
        Returns:
            ids (B, max_len) long, padding mask (B, max_len) bool with True = padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__} ({t!r}), expected a str")
        ids = torch.full((len(texts), self.max_len), PAD_ID, dtype=torch.long)
        for row, t in enumerate(texts):
            enc = self.encode(t[:MAX_TEXT_CHARS])
            ids[row, : len(enc)] = torch.tensor(enc, dtype=torch.long)
        return ids, ids == PAD_ID


def validate_texts(texts: str | Sequence[str], max_chars: int | None = None) -> list[str]:
    """The expressions as a list, or a ValueError/TypeError with one sentence naming the bad one.

    A single string is one expression. Each must be a non-empty string (an empty expression refers
    to nothing, and a mask for it would be noise) of at most ``max_chars`` characters when given.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("give at least one expression")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"text {i + 1} is a {type(t).__name__} ({t!r}), expected a str")
        if not t.strip():
            raise ValueError(f"expression {i + 1} is empty; give a phrase such as 'the man on the left'")
        if max_chars is not None and len(t) > max_chars:
            raise ValueError(f"expression {i + 1} has {len(t):,} characters; the limit is {max_chars:,}")
    return texts


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int) -> Path:
    """Train a small SentencePiece BPE model (for models trained from scratch, e.g. tiny).

    Case is folded in the model's normalizer, and byte fallback maps any character outside the
    corpus (emoji, CJK) to byte pieces instead of the unknown id.
    """
    import sentencepiece as spm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, hard_vocab_limit=False,
        normalization_rule_name="nmt_nfkc_cf", minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    return out
