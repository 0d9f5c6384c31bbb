"""Where a forward pass spends its time at each precision: matrix products, attention, the rest.

    python benchmarks/precision_breakdown.py sharedris_base --threads 2

One forward pass of a registered model (random weights, seed 0; image at the model's size, a
text of up to 20 tokens, its last quarter padding) through the library's precision path
(:class:`sharedris.runtime.ModelRunner`), profiled with ``torch.profiler`` after one warm-up
pass, at fp32 and bf16. Operators are grouped by their self CPU time: ``aten::addmm``/``mm``/``bmm``
(the linear layers), ``aten::_scaled_dot_product_*`` (attention), and everything else. The
speed-up of each group tells which part of the model bf16 accelerates on this CPU.

Then one attention call at the model's shape (its heads, head width and joint sequence length),
median of 5 after a warm-up, each way called in turn, in the ways torch can compute it: the flash
kernel, the math backend, and ``matmul`` + ``softmax`` + ``matmul`` written out, each in fp32 and
bf16; and, for scale, the GFLOP/s of that call and of one fp32 linear layer of the model's width
over the same tokens (its q/k/v projection), the speed the matrix products run at.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from sharedris.benchmark import cpu_description, median_seconds
from sharedris.modeling.registry import build_model
from sharedris.runtime import ModelRunner

GROUPS = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
          "attention": ("aten::_scaled_dot_product",)}


def group_of(name: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), "other")


def attention_variants(heads: int, tokens: int, width: int) -> dict[str, float]:
    """Seconds for one attention call (batch 1, the last 5 keys masked) in each way, and for the
    fp32 q/k/v projection of the same tokens (``"linear fp32"``), median of 5."""
    q, k, v = (torch.randn(1, heads, tokens, width) for _ in range(3))
    keep = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
    keep[..., -5:] = False
    x, w = torch.randn(tokens, heads * width), torch.randn(3 * heads * width, heads * width)
    calls = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)

        def math(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep)

        def written_out(qd=qd, kd=kd, vd=vd) -> torch.Tensor:
            scores = torch.matmul(qd, kd.transpose(-1, -2)) * width ** -0.5
            return torch.matmul(scores.masked_fill(~keep, float("-inf")).softmax(-1), vd)

        calls[f"flash {name}"] = lambda qd=qd, kd=kd, vd=vd: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=keep)
        calls[f"math backend {name}"] = math
        calls[f"matmul-softmax-matmul {name}"] = written_out
    calls["linear fp32"] = lambda: F.linear(x, w)
    return median_seconds(calls)


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
        run = ModelRunner(model, "cpu", precision, runtime="torch")  # PyTorch's own operators, profiled
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
    width = enc.embed_dim // enc.num_heads
    seconds = attention_variants(enc.num_heads, tokens, width)
    linear = seconds.pop("linear fp32")
    flops = 4 * tokens * tokens * width * enc.num_heads  # two matrix products of 2 * N * N * width each
    print(f"one attention call: {enc.num_heads} heads x {tokens} tokens x {width}; vs flash fp32, GFLOP/s")
    for name, t in seconds.items():
        print(f"  {name:28}{t * 1e3:8.2f} ms{seconds['flash fp32'] / t:8.2f}x{flops / t / 1e9:8.0f}")
    linear_flops = 2 * tokens * enc.embed_dim * 3 * enc.embed_dim
    print(f"  {'q/k/v linear layer, fp32':28}{linear * 1e3:8.2f} ms{'':9}{linear_flops / linear / 1e9:8.0f}")


if __name__ == "__main__":
    main()
