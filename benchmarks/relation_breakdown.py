"""Where do a model's masks land on relation expressions? Target, the other candidates, the anchor.

    python benchmarks/relation_breakdown.py default --scenes 400

For each of ``--scenes`` synthetic val scenes of the relation family, the predicted mask's
pixels are split into those on the target, on the other objects of the target's shape (the
candidates the expression must choose between) and on the anchor; reported per mode ("closest
to" / "next to" / "nearest to" vs "farthest from" / "far from") and per number of candidates,
with the mean per-sample IoU.

    python benchmarks/relation_breakdown.py runs/relations_more_192/best --world varied
    python benchmarks/relation_breakdown.py runs/relations_more_192/best \
        --recipe configs/synthetic_tiny_relations_more_192.yaml

``--world`` picks the val scenes' world (flat by default, as the figures in docs/experiments.md
were measured). ``--recipe`` scores instead the relation scenes a training recipe drew in its
last epoch, drawn exactly as it trained on them: a model that scores higher there than on val
scenes has memorised some of them; one that scores no higher does not fit even what it saw.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sharedris import Predictor, load_pretrained
from sharedris.data.registry import build_source
from sharedris.data.synthetic import WORLDS, SyntheticRefScenes, relation_mode
from sharedris.train.config import load_train_config


def relation_scenes(n: int, size: int, world: str = "flat", recipe: str | None = None) -> Iterator[dict[str, Any]]:
    """``n`` relation scenes: of the val split in ``world`` at ``size`` px, or those the training
    recipe ``recipe`` (a config file) drew in its last epoch, in the order and at the size it drew
    them."""
    if recipe is None:
        yield from SyntheticRefScenes("val", size=size, length=n, families=("relation",), world=world)
        return
    cfg = load_train_config(recipe)
    scenes = build_source(cfg.data, "train", train=True)
    if "relation" not in scenes.families:
        raise SystemExit(f"{recipe} trains on no relation scenes")
    scenes.set_epoch(cfg.epochs - 1)
    found = 0
    for i in range(len(scenes)):
        sample = scenes[i]
        if sample["family"] == "relation":
            yield sample
            found += 1
            if found == n:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--scenes", type=int, default=400, help="relation scenes to score")
    ap.add_argument("--world", choices=WORLDS, default="flat", help="the val scenes' world (default: flat)")
    ap.add_argument("--recipe", help="a training config: score its last epoch's relation scenes instead of val's")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_pretrained(args.model))
    scenes = relation_scenes(args.scenes, predictor.config.image_size, args.world, args.recipe)
    rows: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    with torch.inference_mode():
        for sample in scenes:
            pred = predictor.predict(sample["image"], sample["text"]).masks[0]
            labels, target = sample["labels"], sample["target"]
            shape = sample["objects"][target]["shape"]
            others = [k for k, o in enumerate(sample["objects"]) if o["shape"] == shape and k != target]
            on = lambda ks: sum(int((pred & (labels == k + 1)).sum()) for k in ks) / max(int(pred.sum()), 1)  # noqa: E731
            gt = labels == target + 1
            iou = (pred & gt).sum() / max((pred | gt).sum(), 1)
            mode = relation_mode(sample["text"])
            rows[f"{mode}, {len(others) + 1} candidates"].append(
                (iou, on([target]), on(others), on([sample["anchor"]])))
    where = f"the last epoch of {args.recipe}" if args.recipe else f"{args.world}-world val"
    print(f"{args.model}: {sum(map(len, rows.values()))} relation scenes of {where}; share of the mask's pixels on "
          "each object")
    print(f"{'mode':24} {'n':>4} {'IoU':>6} {'target':>7} {'others':>7} {'anchor':>7}")
    for name in sorted(rows):
        r = np.array(rows[name])
        print(f"{name:24} {len(r):4d} " + " ".join(f"{v:{w}.3f}" for v, w in zip(r.mean(0), (6, 7, 7, 7))))


if __name__ == "__main__":
    main()
