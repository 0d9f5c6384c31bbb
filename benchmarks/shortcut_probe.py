"""Can a scene's make-up alone tell whether its expression refers to something? A text-free probe.

A model that learns how a generator composes target scenes, rather than what the words mean, can
answer "no match" without reading the expression. This script trains small classifiers on scene
statistics alone (never the text, never the pixels) to predict "target vs no target" on a
recipe's training scenes, and prints their ROC AUC on scenes they were not fitted on. 0.5 is
chance; a generator without such a shortcut keeps every probe near it.

Features per scene: object count; colour and shape histograms (unnamed shapes included); how many
objects share their colour, their shape, or both with another object; how many distinct colours,
shapes and pairs; the largest colour and shape groups; the background style; layout (mean and
spread of the centres, mean / smallest / largest size and their ratio, nearest-neighbour distance,
area covered). Probes: logistic regression and a one-hidden-layer MLP (torch, full batch), fitted
on the first half of the scenes and scored on the second.

    python benchmarks/shortcut_probe.py configs/synthetic_tiny_varied.yaml --scenes 6000
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from presence_quality import roc_auc

from sharedris.data.registry import build_source
from sharedris.data.synthetic import COLOURS, SHAPES, STYLES
from sharedris.data.synthetic.geometry import UNNAMED_SHAPES
from sharedris.data.synthetic.paint import BACKGROUNDS
from sharedris.progress import progress
from sharedris.train.config import load_train_config

_ALL_SHAPES = SHAPES + UNNAMED_SHAPES
_ALL_STYLES = tuple(dict.fromkeys(STYLES + BACKGROUNDS))


def scene_features(sample: dict[str, Any]) -> np.ndarray:
    """The statistics of one scene the probe may look at: nothing of its expression or its pixels."""
    objs = sample["objects"]
    side = float(max(sample["image"].size))
    colours = Counter(o["colour"] for o in objs)
    shapes = Counter(o["shape"] for o in objs)
    pairs = Counter((o["colour"], o["shape"]) for o in objs)
    centres = np.array([o["centre"] for o in objs]) / side
    scales = np.array([o["scale"] for o in objs]) / side
    nearest = [min((math.dist(a, b) for j, b in enumerate(centres) if j != i), default=1.0)
               for i, a in enumerate(centres)]
    values = [
        len(objs),
        *(colours[c] for c in COLOURS),
        *(shapes[s] for s in _ALL_SHAPES),
        sum(colours[o["colour"]] > 1 for o in objs),
        sum(shapes[o["shape"]] > 1 for o in objs),
        sum(pairs[o["colour"], o["shape"]] > 1 for o in objs),
        len(colours), len(shapes), len(pairs), max(colours.values()), max(shapes.values()),
        *(float(sample.get("style") == s) for s in _ALL_STYLES),
        *centres.mean(0), *centres.std(0),
        scales.mean(), scales.min(), scales.max(), scales.max() / scales.min(),
        float(np.mean(nearest)), float(np.min(nearest)),
        sum(o["area"] for o in objs) / side**2,
    ]
    return np.asarray(values, dtype=np.float64)


def _fit(x: torch.Tensor, y: torch.Tensor, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if hidden:
        net: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(),
                                                   torch.nn.Linear(hidden, 1))
    else:
        net = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y).backward()
        opt.step()
    return net


def probe_auc(features: np.ndarray, has_target: np.ndarray, seed: int = 0) -> dict[str, float]:
    """ROC AUC of each probe on the second half, fitted on the first half (features standardised on it)."""
    half = len(features) // 2
    mean, std = features[:half].mean(0), features[:half].std(0) + 1e-6
    x = torch.as_tensor((features - mean) / std, dtype=torch.float32)
    y = torch.as_tensor(has_target, dtype=torch.float32)
    out = {}
    for name, hidden in (("logistic", 0), ("mlp", 64)):
        net = _fit(x[:half], y[:half], hidden, seed)
        with torch.no_grad():
            score = net(x[half:])[:, 0].numpy()
        test = has_target[half:]
        out[name] = roc_auc(score[test], score[~test])
    return out


def collect(source: Sequence[dict[str, Any]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and "refers to something" labels of the first ``n`` scenes of ``source``."""
    rows, labels = [], []
    for i in progress(range(n), desc="scenes"):
        sample = source[i]
        rows.append(scene_features(sample))
        labels.append(bool(sample["mask"].any()))
    return np.stack(rows), np.array(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a training recipe (its training scenes are probed)")
    parser.add_argument("--scenes", type=int, default=6000, help="training scenes to read (half fit, half score)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_train_config(args.config, [f"data.synthetic_train_size={args.scenes}"])
    features, has_target = collect(build_source(cfg.data, "train", train=True), args.scenes)
    aucs = probe_auc(features, has_target, args.seed)
    print(f"{args.config}: {args.scenes} training scenes, {int((~has_target).sum())} without a target, "
          f"{features.shape[1]} features")
    for name, auc in aucs.items():
        print(f"  {name:<9} presence ROC AUC {auc:.3f}")
    print(f"  highest: {max(aucs.values()):.3f} (0.5 is chance)")


if __name__ == "__main__":
    main()
