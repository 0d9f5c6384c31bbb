"""Bulk prediction (`predict_manifest`: pairs of several images per forward pass, batches in
lanes, decoding workers) vs a Python loop calling `Predictor.predict` image by image, on the same
pairs, side by side, at the same precision.

    python benchmarks/bulk_vs_loop.py --threads 2                  # 250 images x 2 expressions
    python benchmarks/bulk_vs_loop.py --threads 2 --texts 1 --images 500   # one expression per image

Generated synthetic scenes are written as PNG files (so that decoding costs what it costs on real
data), every image gets the same expressions (the first ``--texts`` of ``TEXTS``), and both ways
produce the same output: COCO RLE masks as JSON lines. Each way takes all the pairs at once, as a
user would (one `predict_manifest` call: its workers start once, its lanes fill once), and the two
take turns in the order loop, bulk, bulk, loop, ... for ``--repeats`` turns each, so both see the
same load on a shared machine. Prints pairs per second both ways (all turns together) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sharedris.bulk import default_lanes, default_workers, predict_manifest
from sharedris.data.synthetic import SyntheticRefScenes
from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor
from sharedris.render import encode_rle

TEXTS = ["the purple diamond", "the green triangle on the left"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    parser.add_argument("--images", type=int, default=250)
    parser.add_argument("--texts", type=int, default=2, choices=range(1, len(TEXTS) + 1),
                        help="expressions per image: the loop sends them to the model together")
    parser.add_argument("--size", default="320x240", help="WxH of the generated PNGs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--workers", type=int, default=None,
                        help="bulk: decoding worker processes (default: as predict_manifest picks)")
    parser.add_argument("--batch-size", type=int, default=16, help="bulk: pairs per forward pass")
    parser.add_argument("--lanes", type=int, default=None,
                        help="bulk: batches in the model at once (default: as predict_manifest picks)")
    parser.add_argument("--precision", default="auto", help="both ways (auto: as `sharedris predict` picks)")
    parser.add_argument("--runtime", default="auto", help="both ways (auto: as `sharedris predict` picks)")
    parser.add_argument("--repeats", type=int, default=2, help="turns each way, each over all the pairs")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    texts = TEXTS[:args.texts]
    width, height = (int(v) for v in args.size.lower().split("x"))
    predictor = Predictor(load_pretrained(args.model), precision=args.precision, runtime=args.runtime)
    # as predict_manifest picks
    workers = default_workers(predictor.device) if args.workers is None else args.workers
    lanes = default_lanes(predictor.device) if args.lanes is None else args.lanes
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scenes = SyntheticRefScenes("test", size=max(width, height), length=args.images, seed=0)
        paths = []
        for i in range(args.images):
            path = root / f"{i:04d}.png"
            scenes[i]["image"].resize((width, height)).save(path)
            paths.append(path)
        pairs = len(paths) * len(texts)

        predictor.predict(paths[0], texts)  # warm-up
        # loop, bulk, bulk, loop, ...: both ways see the same drift in load on a shared machine
        seconds = {"loop": 0.0, "bulk": 0.0}
        order = [way for r in range(args.repeats) for way in (("loop", "bulk") if r % 2 == 0 else ("bulk", "loop"))]
        for turn, way in enumerate(order):
            start = time.perf_counter()
            if way == "loop":
                with open(root / f"loop{turn}.jsonl", "w") as f:
                    for path in paths:
                        pred = predictor.predict(path, texts)
                        for k, (mask, score) in enumerate(zip(pred.masks, pred.scores)):
                            f.write(json.dumps({"id": str(path), "text_index": k, "score": round(float(score), 4),
                                                "rle": encode_rle(mask)}) + "\n")
            else:
                summary = predict_manifest(predictor, [{"image": str(p), "texts": texts} for p in paths],
                                           root / f"bulk{turn}", batch_size=args.batch_size, workers=workers,
                                           lanes=lanes, show_progress=False)
                assert summary.written == pairs
            seconds[way] += time.perf_counter() - start
        loop, bulk = (pairs * args.repeats / seconds[way] for way in ("loop", "bulk"))

    print(f"model {args.model}, {args.images} images of {width}x{height} PNG x {len(texts)} expressions = "
          f"{pairs} pairs, {args.threads} torch threads, precision {predictor.precision}, runtime {predictor.runtime}")
    print(f"  loop of Predictor.predict:              {loop:7.1f} pairs/s")
    print(f"  predict_manifest ({workers} workers, {lanes} lanes, batch {args.batch_size}): {bulk:7.1f} pairs/s")
    print(f"  ratio: x{bulk / loop:.2f}")


if __name__ == "__main__":
    main()
