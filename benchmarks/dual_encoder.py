"""Shared-RIS against a dual-encoder (LAVT-class) pipeline: parameters, GFLOPs and CPU latency, side by side.

    OMP_NUM_THREADS=2 python benchmarks/dual_encoder.py --threads 2 --runs 5
    python benchmarks/dual_encoder.py --image-size 480 --text-len 20 --threads 2 --runs 5
    python benchmarks/dual_encoder.py --tiny --image-size 64 --text-len 4 --threads 1 --runs 1   # a smoke test

Checks the efficiency headline of the Shared-RIS paper (Yu et al., arXiv 2408.15521: about 40%
faster inference and 35% fewer parameters than dual-encoder RIS methods) on this machine, in one
process, batch 1, eager PyTorch fp32, random weights (seed 0), with the same image and the same
``--text-len`` token ids (none padded) for both:

* **single encoder**: ``sharedris_base`` (``sharedris.build_model``: BEiT-3 base, Shared FPN, Shared
  Mask Decoder with its presence and IoU heads) through ``forward(image, text_ids,
  text_padding_mask)``, at ``--image-size``.
* **dual encoder**, of LAVT's kind (Yang et al., CVPR 2022, github.com/yz93/LAVT-RIS): the image
  encoder is Hugging Face ``transformers``' ``SwinModel`` with a Swin-B configuration (patch 4,
  embed_dim 128, depths 2-2-18-2, heads 4-8-16-32, window 12, as LAVT's ``swin_type=base`` with
  its window-12 ImageNet-22K weights) at ``--image-size``; the text encoder is ``BertModel`` with
  the BERT-base configuration (12 layers, 768 wide, vocabulary 30522, no pooler, as LAVT drops it);
  and, written here at LAVT's sizes, a language-guided fusion after each of the four Swin stages
  (LAVT's pixel-word attention module, PWAM: a 1x1 projection of the pixels with GELU, one-head
  attention of each pixel over the words (query from the pixels with instance norm, key and value
  from the 768-wide words, output projection with instance norm), their product through a 1x1
  projection with GELU; then LAVT's language gate, Linear-ReLU-Linear-Tanh without biases,
  adding the gated PWAM output to the pixels, and a LayerNorm of the PWAM output per stage for
  the decoder) and LAVT's simple decoder (three top-down steps, each an upsampling, a
  concatenation with the next finer stage and two 3x3 convolutions with batch norm and ReLU,
  512 channels wide for Swin-B, then a 1x1 convolution to a 1-channel mask at 1/4 of the input
  size; LAVT's has 2 channels for its 2-class loss), upsampled to the input size as LAVT does.

Where the fusion sits: LAVT fuses inside each stage of its Swin, after the stage's blocks and
before its patch merging, and passes the fused pixels on to the next stage. ``SwinModel.forward``
has no hook there (inside its stages), so this script runs the ``SwinModel``'s own modules itself,
in its order (patch embedding, each stage's blocks, the fusion, the stage's patch merging) and fuses
at the same place as LAVT: same operations, same FLOPs. Without the fusion this loop computes what
``SwinModel.forward`` does (the test checks it). LAVT normalises each stage's output for its
decoder with its own LayerNorm instead of Swin's final one, so ``SwinModel.layernorm`` is replaced
by an identity and the four norms count as fusion. The table gives each part's parameters and
GFLOPs, the fusion's among them, so that the comparison can be checked part by part.

Printed: the CPU (its model name, instruction sets and torch's kernel level), then per model the
parameters (millions, every parameter of the built modules), GFLOPs of one forward pass (matrix
products, convolutions and attention, counted by ``torch.utils.flop_counter.FlopCounterMode``
through ``sharedris.benchmark``'s attention mapping; 2 FLOPs per multiply-add), the median wall
time of ``--runs`` forward passes after one warm-up, both models called in turn each round
(``sharedris.benchmark.median_seconds``), and GFLOP/s; then the ratios next to the paper's claim:
time dual / single (the paper: ~1.67, "40% faster" read as 40% less time; read as 1.4x the speed
it would be 1.40), parameters single / dual (the paper: ~0.65, 35% fewer), and GFLOPs dual /
single (no claim in the paper's abstract). The paper's figures are its authors' measurements,
against the methods and on the hardware the paper names; this is a CPU measurement against one
LAVT-sized pipeline, random weights, at one image size.

``--image-size`` must leave Swin's last stage at least a window wide (384 px or more with Swin-B):
``transformers`` 5.25's ``SwinModel`` fails on a stage smaller than its window.

``--tiny`` swaps both models for tiny ones (``sharedris_tiny``; a 4-stage Swin 16 wide, a 1-layer
BERT 32 wide) to check the script quickly. Needs ``transformers`` (the ``bench`` or ``dev`` extra).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.benchmark import cpu_description, flop_counter, median_seconds
from sharedris.modeling.registry import build_model

# LAVT's Swin-B (lib/segmentation.py, swin_type "base", window 12) and BERT-base (bert-base-uncased)
SWIN_B: dict[str, Any] = {"patch_size": 4, "embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32],
                          "window_size": 12}
BERT_BASE: dict[str, Any] = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                             "num_attention_heads": 12, "intermediate_size": 3072}
# --tiny: a quick check of the script, not a benchmark
SWIN_TINY: dict[str, Any] = {"patch_size": 4, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4],
                             "window_size": 2}
BERT_TINY: dict[str, Any] = {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64}

# the paper's claims, as the ratios printed below
PAPER_TIME_RATIO = 1 / 0.6  # "~40% faster inference": 40% less time
PAPER_PARAM_RATIO = 0.65  # "35% fewer parameters"


def _instance_norm_over_tokens(x: Tensor) -> Tensor:
    """(B, N, C) normalised per sample and channel over the N tokens (LAVT's InstanceNorm1d, no affine)."""
    return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)


class PixelWordAttention(nn.Module):
    """LAVT's PWAM at one stage: every pixel gathers the words it attends to and is multiplied by them.

    ``dim`` is the stage's width, ``text_dim`` the text encoder's; one attention head, as LAVT's
    default. The 1x1 ``Conv1d`` layers of LAVT are ``Linear`` layers here (same weights, same FLOPs).
    """

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.pixels = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(text_dim, dim)
        self.value = nn.Linear(text_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: Tensor, words: Tensor, word_padding: Tensor | None) -> Tensor:
        """x (B, N, dim) pixels, words (B, L, text_dim), word_padding (B, L) True = padding -> (B, N, dim)."""
        pixels = F.gelu(self.pixels(x))
        q = _instance_norm_over_tokens(self.query(x)).unsqueeze(1)  # (B, 1 head, N, dim)
        k, v = self.key(words).unsqueeze(1), self.value(words).unsqueeze(1)  # (B, 1, L, dim)
        keep = None if word_padding is None else ~word_padding[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).squeeze(1)  # (B, N, dim)
        language = _instance_norm_over_tokens(self.out(attended))
        return F.gelu(self.mix(pixels * language))


class LanguageFusion(nn.Module):
    """PWAM, LAVT's language gate, and the LayerNorm of the stage's output for the decoder.

    Returns the pixels for the next stage (plus the gated PWAM output) and the decoder's feature
    (the PWAM output, normalised), as LAVT's ``MMBasicLayer`` and backbone do.
    """

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.pwam = PixelWordAttention(dim, text_dim)
        self.gate = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(),
                                  nn.Linear(dim, dim, bias=False), nn.Tanh())
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, words: Tensor, word_padding: Tensor | None) -> tuple[Tensor, Tensor]:
        fused = self.pwam(x, words, word_padding)
        return x + self.gate(fused) * fused, self.norm(fused)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SimpleMaskDecoder(nn.Module):
    """LAVT's decoder: coarsest stage upwards, each step upsample + concat the finer stage + two 3x3 convs.

    ``widths`` are the four stages' widths, fine to coarse; the hidden width is half the coarsest
    (512 for Swin-B). Returns (B, 1, H/4, W/4) mask logits at the finest stage's resolution.
    """

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        hidden = widths[3] // 2
        self.steps = nn.ModuleList([
            nn.Sequential(_conv_bn_relu(widths[3] + widths[2], hidden), _conv_bn_relu(hidden, hidden)),
            nn.Sequential(_conv_bn_relu(hidden + widths[1], hidden), _conv_bn_relu(hidden, hidden)),
            nn.Sequential(_conv_bn_relu(hidden + widths[0], hidden), _conv_bn_relu(hidden, hidden)),
        ])
        self.mask = nn.Conv2d(hidden, 1, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        """features: the four stages' (B, C_i, H_i, W_i), fine to coarse."""
        x = features[3]
        for step, skip in zip(self.steps, reversed(features[:3])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = step(torch.cat([x, skip], dim=1))
        return self.mask(x)


class DualEncoderRIS(nn.Module):
    """A LAVT-class pipeline: ``transformers``' SwinModel + BertModel, language fusion in the Swin, LAVT's decoder.

    ``forward(image, text_ids, text_padding_mask)`` takes what :class:`sharedris.SharedRIS` takes
    (padding mask True = padding) and returns (B, 1, H, W) mask logits at the input size.
    """

    def __init__(self, image_size: int, swin: dict[str, Any] | None = None, bert: dict[str, Any] | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel, SwinConfig, SwinModel

        self.swin = SwinModel(SwinConfig(image_size=image_size, **(swin or SWIN_B)), add_pooling_layer=False)
        # LAVT normalises each stage's output itself (the fusion's norms), not Swin's last one
        self.swin.layernorm = nn.Identity()
        self.text = BertModel(BertConfig(**(bert or BERT_BASE)), add_pooling_layer=False)
        cfg = self.swin.config
        widths = [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))]
        self.fusion = nn.ModuleList([LanguageFusion(w, self.text.config.hidden_size) for w in widths])
        self.decoder = SimpleMaskDecoder(widths)

    def image_features(self, image: Tensor, words: Tensor | None, word_padding: Tensor | None) -> list[Tensor]:
        """The four stages' (B, C, H, W) features for the decoder, with the language fused in each stage.

        ``words=None`` skips the fusion: the features are then the stages' outputs before their
        patch merging, as ``SwinModel(..., output_hidden_states_before_downsampling=True)`` gives them.
        """
        x, dims = self.swin.embeddings(image)
        features = []
        for stage, fusion in zip(self.swin.encoder.layers, self.fusion):
            for block in stage.blocks:
                x = block(x, dims)[0]
            feature = x
            if words is not None:
                x, feature = fusion(x, words, word_padding)
            features.append(feature.transpose(1, 2).reshape(x.shape[0], -1, *dims))
            if stage.downsample is not None:
                x = stage.downsample(x, dims)
                dims = ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return features

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> Tensor:
        attention_mask = None if text_padding_mask is None else (~text_padding_mask).long()
        words = self.text(input_ids=text_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.decoder(self.image_features(image, words, text_padding_mask))
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------ measuring
def part_params(model: nn.Module) -> dict[str, int]:
    """Parameters of each direct child of ``model`` (its parts), and their ``"total"``."""
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    return {**{k: v for k, v in parts.items() if v}, "total": sum(p.numel() for p in model.parameters())}


def part_flops(model: nn.Module, fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of ``fn`` per direct child of ``model`` and in all (``"total"``).

    Counted like :func:`sharedris.benchmark.count_flops` (its attention mapping included); FLOPs
    outside every child, if any, are ``"other"``.
    """
    counter = flop_counter()
    with torch.inference_mode(), counter:
        fn()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    root = type(model).__name__
    out: dict[str, int] = {}
    for child, _ in model.named_children():
        prefix = f"{root}.{child}"
        # modules called directly (a part's forward may not run as a whole): sum the outermost ones
        keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
        outermost = [k for k in keys if not any(k.startswith(other + ".") for other in keys)]
        if flops := sum(counts[k] for k in outermost):
            out[child] = flops
    if other := total - sum(out.values()):
        out["other"] = other
    out["total"] = total
    return out


def build_models(image_size: int, tiny: bool = False) -> dict[str, nn.Module]:
    """Both models in eval mode, random weights (seed 0): {"sharedris": ..., "dual": ...}."""
    torch.manual_seed(0)
    single = build_model("sharedris_tiny" if tiny else "sharedris_base", image_size=image_size).eval()
    torch.manual_seed(0)
    dual = DualEncoderRIS(image_size, SWIN_TINY if tiny else SWIN_B, BERT_TINY if tiny else BERT_BASE).eval()
    return {"sharedris": single, "dual": dual}


def inputs(models: dict[str, nn.Module], image_size: int, text_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """One image and ``text_len`` token ids valid in both models' vocabularies, nothing padded."""
    vocab = min(models["sharedris"].config.encoder.vocab_size, models["dual"].text.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, image_size, image_size, generator=g)
    ids = torch.randint(5, vocab, (1, text_len), generator=g)
    return image, ids, torch.zeros(1, text_len, dtype=torch.bool)


def measure(models: dict[str, nn.Module], args: tuple[Tensor, ...], runs: int) -> dict[str, dict[str, Any]]:
    """Per model: ``params`` and ``flops`` (per part, with ``"total"``), ``seconds`` (median, the
    models called in turn each round) and ``gflops_per_s``."""
    fns = {name: (lambda m=m: m(*args)) for name, m in models.items()}
    seconds = median_seconds(fns, runs=runs)
    out = {}
    for name, model in models.items():
        flops = part_flops(model, fns[name])
        out[name] = {"params": part_params(model), "flops": flops, "seconds": seconds[name],
                     "gflops_per_s": flops["total"] / 1e9 / seconds[name]}
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """time dual / single, params single / dual, GFLOPs dual / single."""
    single, dual = results["sharedris"], results["dual"]
    return {"time": dual["seconds"] / single["seconds"],
            "params": single["params"]["total"] / dual["params"]["total"],
            "flops": dual["flops"]["total"] / single["flops"]["total"]}


def _num(x: float) -> str:
    """4 significant figures, no exponent for the sizes printed here."""
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


LABEL = 50  # width of the row labels; the numbers follow in columns of 11


def report(results: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """The table: a row per model (params M, GFLOPs, median ms, GFLOP/s), indented rows per part, ratios."""
    lines = [f"{'':{LABEL}}{'params (M)':>11}{'GFLOPs':>11}{'median ms':>11}{'GFLOP/s':>11}"]
    for name, row in results.items():
        lines.append(f"{labels[name]:{LABEL}}{_num(row['params']['total'] / 1e6):>11}"
                     f"{_num(row['flops']['total'] / 1e9):>11}{_num(row['seconds'] * 1e3):>11}"
                     f"{_num(row['gflops_per_s']):>11}")
        for part in [p for p in {**row["params"], **row["flops"]} if p != "total"]:
            params, flops = row["params"].get(part, 0), row["flops"].get(part, 0)
            lines.append(f"{'  part ' + part:{LABEL}}{_num(params / 1e6) if params else '-':>11}"
                         f"{_num(flops / 1e9) if flops else '-':>11}")
    r = ratios(results)
    lines += ["", f"{'ratio':{LABEL}}{'measured':>11}{'paper':>11}",
              f"{'time dual / sharedris':{LABEL}}{r['time']:>11.3f}{PAPER_TIME_RATIO:>11.3f}  (~40% less time)",
              f"{'params sharedris / dual':{LABEL}}{r['params']:>11.3f}{PAPER_PARAM_RATIO:>11.3f}  (35% fewer)",
              f"{'GFLOPs dual / sharedris':{LABEL}}{r['flops']:>11.3f}{'-':>11}"]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-size", type=int, default=480)
    ap.add_argument("--text-len", type=int, default=20, help="text tokens, the same ids for both models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed forward passes per model (median), after one warm-up")
    ap.add_argument("--tiny", action="store_true", help="tiny models, to check the script (not a benchmark)")
    args = ap.parse_args(argv)
    swin_cfg = SWIN_TINY if args.tiny else SWIN_B
    if args.image_size // (swin_cfg["patch_size"] * 8) < swin_cfg["window_size"]:
        ap.error(f"--image-size {args.image_size} leaves Swin's last stage narrower than its window "
                 f"({swin_cfg['window_size']} tokens of {swin_cfg['patch_size'] * 8} px): use "
                 f"{swin_cfg['window_size'] * swin_cfg['patch_size'] * 8} px or more")
    import transformers

    torch.set_num_threads(args.threads)
    models = build_models(args.image_size, args.tiny)
    results = measure(models, inputs(models, args.image_size, args.text_len), args.runs)
    dual = models["dual"]
    swin, bert = dual.swin.config, dual.text.config
    labels = {"sharedris": "sharedris_tiny" if args.tiny else "sharedris_base",
              "dual": f"dual: {'tiny ' if args.tiny else ''}Swin + BERT + LAVT fusion and decoder"}
    print(cpu_description())
    print(f"transformers {transformers.__version__}")
    print(f"{args.image_size} px, {args.text_len} text tokens, batch 1, fp32, eager, {args.threads} threads, "
          f"median of {args.runs} runs, the two models in turn; Swin embed {swin.embed_dim} depths {swin.depths} "
          f"window {swin.window_size}, BERT {bert.num_hidden_layers} x {bert.hidden_size}, "
          f"attention {swin._attn_implementation}/{bert._attn_implementation}")
    print("\n".join(report(results, labels)))


if __name__ == "__main__":
    main()
