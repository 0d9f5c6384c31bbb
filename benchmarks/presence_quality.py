"""How much the presence and predicted-IoU scores mean, on a synthetic evaluation split.

- Presence: ROC AUC of the presence probability separating expressions that refer to something
  from no-target expressions (1 = every target expression scores above every no-target one).
- Presence per kind of phrasing: N-acc (share answered "no match") of the no-target expressions,
  by the target family whose grammar each follows ("the red circle" is phrased as colour + shape).
- Quality: Spearman rank correlation between the predicted IoU (``scores``) and the real IoU of
  each mask the model answers a target expression with (at the image size; a "no match" answer
  has no mask, and its score is 0 by definition, so it is left out), and the ROC AUC of the
  predicted IoU separating good masks (real IoU >= 0.5) from failures.
- Also the oIoU over the four single-target families together (colour + shape, size, position,
  relation), with the answered masks (emptied on "no match"), which ``sharedris eval`` reports
  only per family.

    python benchmarks/presence_quality.py default --split test
    python benchmarks/presence_quality.py default --heldout      # the held-out renderer, every variant
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from sharedris import Predictor, load_pretrained
from sharedris.data.config import DataConfig
from sharedris.data.heldout import VARIANTS
from sharedris.data.registry import build_source
from sharedris.data.synthetic import FAMILIES, WORLDS
from sharedris.progress import progress


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    values, counts = np.unique(x, return_counts=True)
    for value in values[counts > 1]:  # tied values share their average rank
        r[x == value] = r[x == value].mean()
    return r


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half (Mann-Whitney U)."""
    r = ranks(np.concatenate([positive, negative]))
    u = r[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--split", default="test", choices=["val", "test"])
    ap.add_argument("--scenes", type=int, default=1200, help="scenes of the split (200 per family at 1,200)")
    ap.add_argument("--world", default="varied", choices=WORLDS, help="the generator's world (as eval --world)")
    ap.add_argument("--styles", default="texture", help="flat world: background styles, comma-separated (as eval --styles)")
    ap.add_argument("--heldout", action="store_true",
                    help="score the held-out renderer's variants instead (SCENES per variant; --split ignored)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_pretrained(args.model))
    # the same scenes as `sharedris eval --dataset synthetic --split SPLIT --num-samples SCENES`
    # (with --heldout: as `sharedris eval --dataset synthetic --renderer heldout --num-samples SCENES`)
    data = DataConfig(synthetic_image_size=predictor.config.image_size, synthetic_eval_size=args.scenes,
                      synthetic_styles=tuple(args.styles.split(",")), synthetic_world=args.world)
    if args.heldout:
        sources = [build_source(replace(data, synthetic_renderer="heldout", synthetic_heldout_variant=v), "test", False)
                   for v in VARIANTS]
    else:
        sources = [build_source(data, args.split, train=False)]
    count = sum(len(source) for source in sources)
    scenes = (source[i] for source in sources for i in range(len(source)))
    present, has_target, predicted_iou, real_iou = [], [], [], []
    no_match: dict[str, list[bool]] = {}  # no-target expressions answered "no match", by phrasing
    inter = union = 0  # single-target families, answered masks
    for sample in progress(scenes, total=count, desc="scenes"):
        out = predictor.predict(sample["image"], sample["text"])
        gt = sample["mask"]
        present.append(float(out.present[0]))
        has_target.append(bool(gt.any()))
        if not gt.any() and sample["family"] != "unknown_word":
            no_match.setdefault(sample["phrased_as"], []).append(not out.matched[0])
        if gt.any() and out.matched[0]:
            mask = out.masks[0]
            predicted_iou.append(float(out.scores[0]))
            real_iou.append((mask & gt).sum() / (mask | gt).sum())
        if sample["family"] in FAMILIES:
            answered = out.masks[0]
            inter += int((answered & gt).sum())
            union += int((answered | gt).sum())
    present_a, has_target_a = np.array(present), np.array(has_target)
    auc = roc_auc(present_a[has_target_a], present_a[~has_target_a])
    predicted_iou_a, real_iou_a = np.array(predicted_iou), np.array(real_iou)
    rho = spearman(predicted_iou_a, real_iou_a)
    good = real_iou_a >= 0.5
    where = "held-out renderer, every variant" if args.heldout else f"{args.world} world, {args.split} split"
    print(f"{args.model}: {where}, {count} scenes ({has_target_a.sum()} with a target, "
          f"{(~has_target_a).sum()} without)")
    print(f"presence ROC AUC (target vs no-target):       {auc:.4f}")
    for family, answers in sorted(no_match.items()):
        print(f"  N-acc of no-target expressions phrased as {family + ':':<13} {np.mean(answers):.3f} ({len(answers)})")
    print(f"predicted IoU vs real IoU, Spearman (answered targets, {len(real_iou_a)}): {rho:.4f}")
    print(f"predicted IoU, ROC AUC of IoU >= 0.5 vs < 0.5:  {roc_auc(predicted_iou_a[good], predicted_iou_a[~good]):.4f} "
          f"({good.sum()} vs {(~good).sum()} masks)")
    print(f"oIoU over the four single-target families:    {inter / max(union, 1):.4f}")


if __name__ == "__main__":
    main()
