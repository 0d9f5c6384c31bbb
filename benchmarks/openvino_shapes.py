"""The OpenVINO runtime's two compiled models on one pair, side by side: fixed shapes against dynamic ones.

    python benchmarks/openvino_shapes.py sharedris_base --threads 2

:class:`~sharedris.runtime.OpenVINOModel` compiles a model twice: with every input shape fixed to
one pair at the model's text length (what answers one expression) and with dynamic batch size and
text length (every other call). This builds a registered model with random weights (seed 0), one
OpenVINOModel at bf16 (``--precision`` for another) on an empty conversion cache in a temporary
folder (so that both are compiled here, from one conversion), and feeds the same pair (a random
image, the model's text length with a third of it padding) to both compiled models in turn,
median of ``--runs`` after a warm-up. It prints both times, their ratio and the largest
difference between their mask logits.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from sharedris.benchmark import cpu_description, median_seconds
from sharedris.conversions import ConversionCache
from sharedris.modeling.registry import build_model
from sharedris.runtime import OPENVINO_PRECISIONS, OpenVINOModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a registered model name, e.g. sharedris_base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--precision", choices=sorted(OPENVINO_PRECISIONS), default="bf16")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    S, L = model.config.image_size, model.config.text_len
    pad = torch.zeros(1, L, dtype=torch.bool)
    pad[:, L - L // 3:] = True
    feed = {"image": torch.randn(1, 3, S, S).numpy(), "text_ids": torch.randint(4, 100, (1, L)).numpy(),
            "text_padding_mask": pad.numpy()}
    with tempfile.TemporaryDirectory() as folder:  # the dynamic model compiles the conversion kept there
        compiled = OpenVINOModel(model, args.precision, threads=args.threads, cache=ConversionCache(folder))
        requests = {"fixed": compiled.single.create_infer_request(), "dynamic": compiled.dynamic.create_infer_request()}
    times = median_seconds({name: lambda r=r: r.infer(feed) for name, r in requests.items()}, runs=args.runs)
    diff = abs(requests["fixed"].get_output_tensor(0).data - requests["dynamic"].get_output_tensor(0).data).max()
    print(cpu_description())
    print(f"{args.model} ({S} px, random weights), OpenVINO {args.precision}, one pair ({L} tokens), "
          f"{args.threads} threads, median of {args.runs}")
    print(f"  fixed shapes:   {times['fixed'] * 1000:8.1f} ms")
    print(f"  dynamic shapes: {times['dynamic'] * 1000:8.1f} ms")
    print(f"  speed-up of fixed shapes: x{times['dynamic'] / times['fixed']:.2f} (mask logits differ by at most {diff:.2e})")


if __name__ == "__main__":
    main()
