"""What do a model's features know about each object? Linear probes for shape and colour.

    python benchmarks/linear_probe.py default --scenes 600

For every object of ``--scenes`` synthetic val scenes, the feature vector at the object's centre is
taken from each encoder tap (patch grid) and from the Shared FPN's pixel features; a linear
classifier (softmax regression, Adam) is fitted on 70% of the objects and scored on the rest, once
for the object's shape and once for its colour. The text is a neutral "the thing", so the features
describe the image, not the expression. Chance is 1/6 for both.

    python benchmarks/linear_probe.py default --relations --scenes 1400

``--relations`` asks instead where the model works out a relation: of ``--scenes`` val relation
scenes, those with three candidates (objects of the named shape), read with their own expression;
a linear scorer of the feature at each candidate's centre is fitted (softmax over the three) to
pick the referent on 70% of the scenes and scored on the rest, for "closest to" and "farthest
from" apart, beside how often, on the same held-out scenes, the model's own mask holds most of its
pixels on the referent. Chance is 1/3.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from sharedris import Predictor, load_pretrained
from sharedris.data.synthetic import COLOURS, SHAPES, SyntheticRefScenes, relation_mode
from sharedris.data.transforms import image_to_tensor
from sharedris.text import Tokenizer


def _maps(model, image, ids, pad) -> dict[str, torch.Tensor]:
    """Each encoder tap's patch grid and the Shared FPN's pixel features, (C, h, w) each."""
    cfg = model.config
    g = cfg.encoder.grid_size
    x = image_to_tensor(image, cfg.image_size, cfg.mean, cfg.std)[None]
    taps = model.encoder.forward_intermediates(x, ids, pad, model.taps)
    maps = {f"tap {t}": v[0, 1:].T.reshape(-1, g, g) for t, (v, _) in zip(model.taps, taps)}
    maps["pixel"] = model.fpn(taps, pad, g, x).pixel[0]
    return maps


def _at(fmap: torch.Tensor, centre: tuple[float, float], size: int) -> np.ndarray:
    """The feature vector of ``fmap`` at the cell holding ``centre`` (x, y in pixels of ``size``)."""
    stride = size / fmap.shape[-1]
    r, c = (min(int(v // stride), fmap.shape[-1] - 1) for v in (centre[1], centre[0]))
    return fmap[:, r, c].numpy()


def _features(model, scenes: int) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]:
    cfg = model.config
    tokenizer = Tokenizer(model.tokenizer_file, max_len=cfg.text_len)
    ids, pad = tokenizer(["the thing"])
    ds = SyntheticRefScenes("val", size=cfg.image_size, length=scenes)
    feats: dict[str, list[np.ndarray]] = {}
    shapes, colours = [], []
    with torch.inference_mode():
        for i in range(len(ds)):
            sample = ds[i]
            maps = _maps(model, sample["image"], ids, pad)
            for obj in sample["objects"]:
                for name, fmap in maps.items():
                    feats.setdefault(name, []).append(_at(fmap, obj["centre"], cfg.image_size))
                shapes.append(SHAPES.index(obj["shape"]))
                colours.append(list(COLOURS).index(obj["colour"]))
    return feats, np.array(shapes), np.array(colours)


def _candidate_features(model, scenes: int) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Per mode ("near" / "far"): the features at the 3 candidates of each relation scene that has 3,
    (scenes, 3, C) per map; the referent's place among them; the model's own pick (most mask pixels)."""
    cfg = model.config
    tokenizer = Tokenizer(model.tokenizer_file, max_len=cfg.text_len)
    predictor = Predictor(model, runtime="torch")
    rows: dict[str, list[tuple[dict[str, np.ndarray], int, int]]] = {"near": [], "far": []}
    with torch.inference_mode():
        for sample in SyntheticRefScenes("val", size=cfg.image_size, length=scenes, families=("relation",)):
            target, objects = sample["target"], sample["objects"]
            candidates = [k for k, o in enumerate(objects) if o["shape"] == objects[target]["shape"]]
            if len(candidates) != 3:
                continue
            ids, pad = tokenizer([sample["text"]])
            maps = _maps(model, sample["image"], ids, pad)
            feats = {name: np.stack([_at(f, objects[k]["centre"], cfg.image_size) for k in candidates])
                     for name, f in maps.items()}
            mask = predictor.predict(sample["image"], sample["text"]).masks[0]
            pick = int(np.argmax([(mask & (sample["labels"] == k + 1)).sum() for k in candidates]))
            mode = relation_mode(sample["text"])
            rows[mode].append((feats, candidates.index(target), pick))
    return {mode: ({name: np.stack([r[0][name] for r in found]) for name in found[0][0]},
                   np.array([r[1] for r in found]), np.array([r[2] for r in found]))
            for mode, found in rows.items() if found}


def _probe(x: np.ndarray, y: np.ndarray, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier trained on the first 70% of the rows."""
    train = first_70_percent(len(y))
    x_t = _standardised(x, train)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_t.shape[1], int(y.max()) + 1)
    return _fit(lambda: head(x_t), head, torch.tensor(y), train, steps)


def _pick_probe(x: np.ndarray, y: np.ndarray, steps: int = 300) -> float:
    """Held-out accuracy of one linear score per candidate, ``x`` (scenes, candidates, C), at picking
    candidate ``y`` of each scene (softmax over a scene's candidates), fitted on the first 70% of the scenes."""
    n, k, c = x.shape
    train = first_70_percent(n)
    x_t = _standardised(x.reshape(n * k, c), train.repeat_interleave(k))
    torch.manual_seed(0)
    head = torch.nn.Linear(c, 1)
    return _fit(lambda: head(x_t).reshape(n, k), head, torch.tensor(y), train, steps)


def first_70_percent(n: int) -> torch.Tensor:
    """The rows a probe is fitted on, of ``n``: the first 70%; it is scored on the others."""
    return torch.arange(n) < int(0.7 * n)


def _standardised(x: np.ndarray, train: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor, standardised with the statistics of its ``train`` rows."""
    x_t = torch.tensor(x, dtype=torch.float32)
    return (x_t - x_t[train].mean(0)) / (x_t[train].std(0) + 1e-5)


def _fit(logits, head: torch.nn.Module, y: torch.Tensor, train: torch.Tensor, steps: int) -> float:
    """Fit ``head`` by cross-entropy of ``logits()`` on the ``train`` rows; accuracy on the others."""
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(logits()[train], y[train]).backward()
        opt.step()
    with torch.no_grad():
        return (logits()[~train].argmax(1) == y[~train]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--scenes", type=int, default=600, help="val scenes to take objects from")
    ap.add_argument("--relations", action="store_true",
                    help="probe which of three candidates a relation expression means, instead of shape and colour")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model).float().eval()
    if args.relations:
        found = _candidate_features(model, args.scenes)
        print(f"{args.model}: relation scenes with 3 candidates among {args.scenes} val scenes; chance 1/3")
        for mode, (feats, referent, pick) in found.items():
            held_out = ~first_70_percent(len(referent)).numpy()
            own = float((pick == referent)[held_out].mean())  # on the scenes the probes are scored on
            print(f"{mode}: {len(referent)} scenes; the model's own mask picks the referent {own:.3f}")
            for name, x in feats.items():
                print(f"  {name:10} {_pick_probe(x, referent):6.3f}")
        return
    feats, shapes, colours = _features(model, args.scenes)
    print(f"{args.model}: {len(shapes)} objects from {args.scenes} val scenes; chance 1/6 = 0.167")
    print(f"{'features':10} {'shape':>6} {'colour':>7}")
    for name, rows in feats.items():
        x = np.stack(rows)
        print(f"{name:10} {_probe(x, shapes):6.3f} {_probe(x, colours):7.3f}")


if __name__ == "__main__":
    main()
