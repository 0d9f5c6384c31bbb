"""onnxruntime vs PyTorch on the CPU, side by side in one run, at each precision.

    python benchmarks/onnx_vs_torch.py default --threads 2 --runs 10
    python benchmarks/onnx_vs_torch.py runs/tiny/best --batch 1,8
    python benchmarks/onnx_vs_torch.py sharedris_base --batch 1 --runs 5 --precision fp32,bf16,int8 --ort-int8 --openvino

The model is ``default``, a checkpoint folder, or a registered model name (``sharedris_base``:
random weights, seed 0). It is exported to a temporary ONNX file, then the model forward pass
(image + text ids + padding mask -> mask logits, presence logit and predicted IoU; no
preprocessing) is timed in PyTorch at each
``--precision`` (through :class:`sharedris.Predictor`, the library's inference path) and in
onnxruntime (fp32 and, with ``--ort-int8``, the graph's MatMuls dynamically quantized to int8 by
``onnxruntime.quantization.quantize_dynamic``: the same layers that PyTorch's int8 quantizes), with
the same inputs and thread count. All variants are called in turn each round, so that other load on
the machine falls on all alike; ratios are against PyTorch fp32, and so are the max abs differences
of the mask logits. ``--openvino`` also runs the ONNX file in OpenVINO, with its inference precision
hint at f32 and at bf16 (OpenVINO's default on CPUs with native bf16). Needs the ``onnx`` extra (and
``int8`` for PyTorch int8, ``openvino`` for ``--openvino``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sharedris.benchmark import concrete_precisions, cpu_description, median_seconds
from sharedris.export import INPUT_NAMES, export_onnx
from sharedris.modeling.pretrained import load_pretrained, resolve_tokenizer
from sharedris.modeling.registry import build_model, list_models, model_config
from sharedris.predictor import Predictor

TEXTS = ["the man on the left in a blue shirt", "red car", "the second cup from the right on the table",
         "dog", "the person holding an umbrella", "small white boat behind the pier", "left", "top sign"]


def _model(name: str) -> tuple[torch.nn.Module, Path | None]:
    """The model, and a tokenizer file when the model has none of its own.

    A registered model name builds that model with random weights; its text ids then come from the
    bundled ``sharedris_tiny`` tokenizer (random weights read any ids alike, and base and large use
    BEiT-3's tokenizer, which is not bundled). Anything else is loaded with its own tokenizer.
    """
    if name in list_models():
        torch.manual_seed(0)
        return build_model(name).eval(), resolve_tokenizer(model_config("sharedris_tiny"))
    return load_pretrained(name), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"'default', a checkpoint folder, or one of {', '.join(list_models())} "
                                      "(random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8],
                        help="batch sizes (expressions per image), comma-separated")
    parser.add_argument("--precision", type=lambda s: [x for x in s.split(",") if x], default=["fp32"],
                        help="PyTorch precisions, comma-separated (fp32 is always timed: the reference)")
    parser.add_argument("--ort-int8", action="store_true",
                        help="also time onnxruntime on the graph with dynamically quantized int8 MatMuls")
    parser.add_argument("--openvino", action="store_true",
                        help="also time OpenVINO on the same ONNX file, at f32 and bf16 (pip install openvino)")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model, tokenizer = _model(args.model)
    cfg = model.config
    predictors = {f"torch {p}": Predictor(model, tokenizer, precision=p)
                  for p in concrete_precisions(["fp32", *args.precision])}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"ort fp32": export_onnx(model, Path(tmp) / "model.onnx")}
        if args.ort_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            paths["ort int8"] = Path(tmp) / "model_int8.onnx"
            quantize_dynamic(paths["ort fp32"], paths["ort int8"], op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        # each runtime as feeds -> mask logits (its first output)
        runners: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {}
        for name, path in paths.items():
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            runners[name] = lambda feeds, session=session: session.run(None, feeds)[0]
        if args.openvino:
            import openvino as ov

            core = ov.Core()
            for hint in ("f32", "bf16"):
                compiled = core.compile_model(str(paths["ort fp32"]), "CPU", {
                    "INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": hint})
                runners[f"openvino {hint}"] = lambda feeds, compiled=compiled: compiled(feeds)[0]

        print(cpu_description())
        print(f"model {args.model} ({cfg.image_size} px, text length {cfg.text_len}), {args.threads} threads, "
              f"median of {args.runs} runs; onnxruntime {ort.__version__}")
        print(f"{'batch':>5} {'runtime':<13} {'time':>10} {'x torch fp32':>12} {'max|diff|':>10}")
        for batch in args.batch:
            texts = (TEXTS * (batch // len(TEXTS) + 1))[:batch]
            image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
            ids, pad = predictors["torch fp32"].prepare_texts(texts)
            feeds = dict(zip(INPUT_NAMES, (image.numpy(), ids.numpy(), pad.numpy())))
            fns: dict[str, Callable[[], np.ndarray]] = {
                **{name: lambda p=p: p.forward(image, ids, pad).mask_logits.numpy() for name, p in predictors.items()},
                **{name: lambda run=run: run(feeds) for name, run in runners.items()},
            }
            times = median_seconds(fns, runs=args.runs)
            with torch.inference_mode():
                logits = {name: fn() for name, fn in fns.items()}
            for name, seconds in times.items():
                diff = float(np.abs(logits[name] - logits["torch fp32"]).max())
                print(f"{batch:>5} {name:<13} {seconds * 1000:8.1f}ms {times['torch fp32'] / seconds:>11.2f}x "
                      f"{diff:10.1e}")


if __name__ == "__main__":
    main()
