"""Where do a model's masks land on relation expressions? Target, the other candidates, the anchor.

    python benchmarks/relation_breakdown.py default --scenes 400

For each of ``--scenes`` synthetic val scenes of the relation family, the predicted mask's
pixels are split into those on the target, on the other objects of the target's shape (the
candidates the expression must choose between) and on the anchor; reported per mode ("closest
to" / "next to" / "nearest to" vs "farthest from" / "far from") and per number of candidates,
with the mean per-sample IoU.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from sharedris import Predictor, load_pretrained
from sharedris.data.synthetic import SyntheticRefScenes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--scenes", type=int, default=400, help="relation scenes of the val split")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_pretrained(args.model))
    scenes = SyntheticRefScenes("val", size=predictor.config.image_size, length=args.scenes, families=("relation",))
    rows: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    with torch.inference_mode():
        for sample in (scenes[i] for i in range(len(scenes))):
            pred = predictor.predict(sample["image"], sample["text"]).masks[0]
            labels, target = sample["labels"], sample["target"]
            shape = sample["objects"][target]["shape"]
            others = [k for k, o in enumerate(sample["objects"]) if o["shape"] == shape and k != target]
            on = lambda ks: sum(int((pred & (labels == k + 1)).sum()) for k in ks) / max(int(pred.sum()), 1)  # noqa: E731
            gt = labels == target + 1
            iou = (pred & gt).sum() / max((pred | gt).sum(), 1)
            mode = "far" if "far" in sample["text"] else "near"
            rows[f"{mode}, {len(others) + 1} candidates"].append(
                (iou, on([target]), on(others), on([sample["anchor"]])))
    print(f"{args.model}: {args.scenes} val relation scenes; share of the mask's pixels on each object")
    print(f"{'mode':24} {'n':>4} {'IoU':>6} {'target':>7} {'others':>7} {'anchor':>7}")
    for name in sorted(rows):
        r = np.array(rows[name])
        print(f"{name:24} {len(r):4d} " + " ".join(f"{v:{w}.3f}" for v, w in zip(r.mean(0), (6, 7, 7, 7))))


if __name__ == "__main__":
    main()
