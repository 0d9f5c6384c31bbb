"""Where a forward pass spends its time at each precision: matrix products, attention, the rest.

    python benchmarks/precision_breakdown.py sharedris_base --threads 2

One forward pass of a registered model (random weights, seed 0; image at the model's size, a
text of up to 20 tokens, its last quarter padding) through the library's precision path
(:func:`sharedris.precision.prepare_model`), profiled with ``torch.profiler`` after one warm-up
pass, at fp32 and bf16. Operators are grouped by their self CPU time: ``aten::addmm``/``mm``/``bmm``
(the linear layers), ``aten::_scaled_dot_product_*`` (attention), and everything else. The
speed-up of each group tells which part of the model bf16 accelerates on this CPU.

Then one attention call at the model's shape (its heads, head width and joint sequence length),
median of 5 after a warm-up, in the ways torch can compute it: the flash kernel in fp32 and bf16,
the math backend in bf16, and bf16 ``matmul`` + ``softmax`` + ``matmul`` written out.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from sharedris.benchmark import cpu_description, median_seconds
from sharedris.modeling.registry import build_model
from sharedris.precision import autocast_context, prepare_model

GROUPS = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
          "attention": ("aten::_scaled_dot_product",)}


def group_of(name: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), "other")


def attention_variants(heads: int, tokens: int, width: int) -> dict[str, float]:
    """Seconds for one attention call (batch 1, the last 5 keys masked) in each way, median of 5."""
    q, k, v = (torch.randn(1, heads, tokens, width) for _ in range(3))
    keep = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
    keep[..., -5:] = False
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()

    def math_bf16() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep)

    def written_out_bf16() -> torch.Tensor:
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * width ** -0.5
        return torch.matmul(scores.masked_fill(~keep, float("-inf")).softmax(-1), vb)

    return median_seconds({
        "flash fp32": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "flash bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=keep),
        "math backend bf16": math_bf16,
        "matmul-softmax-matmul bf16": written_out_bf16,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a registered model name, e.g. sharedris_base")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    size = model.config.image_size
    length = min(20, model.config.text_len)
    image = torch.randn(1, 3, size, size)
    ids = torch.randint(5, model.config.encoder.vocab_size, (1, length))
    pad = torch.zeros(1, length, dtype=torch.bool)
    pad[0, length * 3 // 4:] = True
    times: dict[str, dict[str, float]] = {}
    for precision in ("fp32", "bf16"):
        run, dtype = prepare_model(model, precision, "cpu")
        with torch.inference_mode(), autocast_context("cpu", dtype):
            run(image, ids, pad)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(image, ids, pad)
        split = dict.fromkeys([*GROUPS, "other"], 0.0)
        for event in prof.key_averages():
            split[group_of(event.key)] += event.self_cpu_time_total / 1e3  # ms
        times[precision] = split
    print(cpu_description())
    print(f"{args.model} at {size} px, batch 1, {args.threads} threads; self CPU time of one forward pass")
    print(f"{'':18}{'fp32 ms':>10}{'bf16 ms':>10}{'speed-up':>10}")
    for group in [*GROUPS, "other", "total"]:
        if group == "total":
            fp32, bf16 = (sum(times[p].values()) for p in ("fp32", "bf16"))
        else:
            fp32, bf16 = times["fp32"][group], times["bf16"][group]
        print(f"{group:18}{fp32:10.1f}{bf16:10.1f}{fp32 / max(bf16, 1e-9):9.2f}x")
    enc = model.config.encoder
    tokens = (size // enc.patch_size) ** 2 + length
    seconds = attention_variants(enc.num_heads, tokens, enc.embed_dim // enc.num_heads)
    print(f"one attention call: {enc.num_heads} heads x {tokens} tokens x {enc.embed_dim // enc.num_heads}")
    for name, t in seconds.items():
        print(f"  {name:28}{t * 1e3:8.2f} ms{seconds['flash fp32'] / t:8.2f}x")


if __name__ == "__main__":
    main()
