"""Where a forward pass spends its time at each precision: matrix products, attention, the rest.

    python benchmarks/precision_breakdown.py sharedris_base --threads 2

One forward pass of a registered model (random weights, seed 0; image at the model's size, a
text of up to 20 tokens, its last quarter padding) through the library's precision path
(:func:`sharedris.precision.prepare_model`), profiled with ``torch.profiler`` after one warm-up
pass, at fp32 and bf16. Operators are grouped by their self CPU time: ``aten::addmm``/``mm``/``bmm``
(the linear layers), ``aten::_scaled_dot_product_*`` (attention), and everything else. The
speed-up of each group tells which part of the model bf16 accelerates on this CPU.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from sharedris.benchmark import cpu_description
from sharedris.modeling.registry import build_model
from sharedris.precision import autocast_context, prepare_model

GROUPS = {"matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
          "attention": ("aten::_scaled_dot_product",)}


def group_of(name: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), "other")


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


if __name__ == "__main__":
    main()
