"""onnxruntime vs PyTorch on the CPU, side by side in one run, for one checkpoint folder.

    python benchmarks/onnx_vs_torch.py default --threads 2 --runs 10
    python benchmarks/onnx_vs_torch.py runs/tiny/best --batch 1,8

Exports the model to a temporary ONNX file, then times the model forward pass (image + text ids
+ padding mask -> logits; no preprocessing) in both runtimes with the same inputs and thread
count, calling them in turn so that other load on the machine falls on both alike. Needs the
``onnx`` extra.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from sharedris.benchmark import median_seconds
from sharedris.export import INPUT_NAMES, export_onnx
from sharedris.modeling.pretrained import load_pretrained
from sharedris.text import Tokenizer

TEXTS = ["the man on the left in a blue shirt", "red car", "the second cup from the right on the table",
         "dog", "the person holding an umbrella", "small white boat behind the pier", "left", "top sign"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="'default' or a checkpoint folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8],
                        help="batch sizes (expressions per image), comma-separated")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model)
    cfg = model.config
    tokenizer = Tokenizer(model.tokenizer_file, max_len=cfg.text_len)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        print(f"model {args.model} ({cfg.image_size} px, text length {cfg.text_len}), {args.threads} threads, "
              f"median of {args.runs} runs; onnxruntime {ort.__version__}, torch {torch.__version__}")
        print(f"{'batch':>5} {'pytorch':>10} {'onnxruntime':>12} {'speedup':>8} {'max|diff|':>10}")
        for batch in args.batch:
            texts = (TEXTS * (batch // len(TEXTS) + 1))[:batch]
            image = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
            ids, pad = tokenizer(texts)
            feeds = dict(zip(INPUT_NAMES, (image.numpy(), ids.numpy(), pad.numpy())))
            times = median_seconds({"torch": lambda: model(image, ids, pad),
                                    "ort": lambda: session.run(None, feeds)}, runs=args.runs)
            with torch.inference_mode():
                diff = float(np.abs(session.run(None, feeds)[0] - model(image, ids, pad).mask_logits.numpy()).max())
            print(f"{batch:>5} {times['torch'] * 1000:8.1f}ms {times['ort'] * 1000:10.1f}ms "
                  f"x{times['torch'] / times['ort']:7.2f} {diff:10.1e}")


if __name__ == "__main__":
    main()
