"""A whole forward pass's GFLOP/s against that of its own linear layers alone, side by side.

    python benchmarks/gemm_efficiency.py sharedris_base --threads 2

One eager PyTorch fp32 forward pass of a registered model (random weights, seed 0; batch 1, image
at the model's size, a text of 20 tokens, its last quarter padding). Its FLOPs are counted by :func:`sharedris.benchmark.count_flops` (matrix products,
convolutions, attention). A forward hook records the input of every ``nn.Linear`` during one pass;
the linear layers alone are then those same products (``F.linear`` with the layers' own weights on
the recorded inputs, one after another). Both are timed in turn, median of ``--runs`` after a
warm-up, and the script prints both rates and their ratio: how close the whole model runs to the
speed of its matrix products (1.0 = nothing else costs time).

Memory is set up as the library's CPU runner sets it (:func:`sharedris.devices.keep_freed_memory`);
``SHAREDRIS_MALLOC_TUNING=off`` measures with the C library's defaults instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharedris.benchmark import count_flops, cpu_description, median_seconds, registered_model_from_args
from sharedris.devices import keep_freed_memory


def main() -> None:
    args, model = registered_model_from_args(__doc__.split("\n\n")[0])
    tuned = keep_freed_memory()
    size, length = model.config.image_size, min(20, model.config.text_len)
    image = torch.randn(1, 3, size, size)
    ids = torch.randint(5, model.config.encoder.vocab_size, (1, length))
    pad = torch.zeros(1, length, dtype=torch.bool)
    pad[0, length * 3 // 4:] = True

    def forward() -> object:
        return model(image, ids, pad)

    calls: list[tuple[nn.Linear, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inputs, out: calls.append((m, inputs[0].detach())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        forward()
    for h in hooks:
        h.remove()

    def linears() -> None:
        for m, x in calls:
            F.linear(x, m.weight, m.bias)

    whole_flops = count_flops(forward)
    linear_flops = count_flops(linears)
    times = median_seconds({"whole": forward, "linear": linears}, runs=args.runs)
    whole_rate = whole_flops / times["whole"] / 1e9
    linear_rate = linear_flops / times["linear"] / 1e9
    print(cpu_description())
    print(f"{args.model} at {size} px, batch 1, {length} text tokens, fp32, {args.threads} threads, "
          f"eager PyTorch, median of {args.runs}; malloc {'set to reuse freed memory' if tuned else 'as the C library sets it'}")
    print(f"  whole forward pass: {whole_flops / 1e9:8.1f} GFLOP in {times['whole'] * 1e3:8.1f} ms = {whole_rate:6.1f} GFLOP/s")
    print(f"  its {len(calls)} linear layers alone: {linear_flops / 1e9:8.1f} GFLOP in {times['linear'] * 1e3:8.1f} ms "
          f"= {linear_rate:6.1f} GFLOP/s")
    print(f"  ratio (whole / linear layers): {whole_rate / linear_rate:.3f}")


if __name__ == "__main__":
    main()
