"""The BEiT-3 tokenizer on a SentencePiece model trained inside the test (no download)."""

import io

import pytest
import sentencepiece as spm
import torch

from sharedris.text import Tokenizer

CORPUS = [
    "the man on the left in a blue shirt", "red car next to the tree", "the small dog behind the bike",
    "woman holding an umbrella", "the big white horse", "left zebra", "the person in the middle",
    "a green bottle on the table", "the giraffe closest to the fence", "the bowl of soup on the right",
] * 20


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=48, minloglevel=2,
                                   model_type="unigram", character_coverage=1.0)
    path = tmp_path_factory.mktemp("spm") / "test.spm"
    path.write_bytes(model.getvalue())
    return path


def test_ids_follow_the_fairseq_mapping(spm_file):
    tok = Tokenizer(spm_file, max_len=24)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    texts = ["the man on the left", "red car"]
    ids, pad = tok(texts)
    assert ids.dtype == torch.long and pad.dtype == torch.bool and ids.shape == pad.shape == (2, 24)
    for row, text in enumerate(texts):
        pieces = sp.encode(text)
        assert 0 not in pieces  # all in-vocabulary
        expected = [0] + [p + 1 for p in pieces] + [2]
        n = len(expected)
        assert ids[row, :n].tolist() == expected
        assert ids[row, n:].tolist() == [1] * (24 - n)
        assert pad[row].tolist() == [False] * n + [True] * (24 - n)


def test_unknown_piece_becomes_3(spm_file):
    tok = Tokenizer(spm_file, max_len=16)
    ids = tok.encode("the 猫")  # a character the model never saw
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    assert 0 in sp.encode("the 猫")
    assert 3 in ids and 1 not in ids


def test_truncation_keeps_the_final_end_token(spm_file):
    tok = Tokenizer(spm_file, max_len=6)
    ids, pad = tok(["the man on the left in a blue shirt next to the tree"])
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    pieces = sp.encode("the man on the left in a blue shirt next to the tree")
    assert ids[0].tolist() == [0] + [p + 1 for p in pieces[:4]] + [2]
    assert not pad.any()


def test_empty_text_and_single_string(spm_file):
    tok = Tokenizer(spm_file, max_len=5)
    ids, pad = tok([""])
    assert ids[0].tolist() == [0, 2, 1, 1, 1]
    assert pad[0].tolist() == [False, False, True, True, True]
    one, _ = tok("red car")
    assert torch.equal(one, tok(["red car"])[0])


def test_non_string_is_named(spm_file):
    tok = Tokenizer(spm_file)
    with pytest.raises(TypeError, match=r"text 1 is a int \(5\)"):
        tok(["red car", 5])


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.spm")
    bad = tmp_path / "bad.spm"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)
