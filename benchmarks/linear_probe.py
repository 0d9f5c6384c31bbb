"""What do a model's features know about each object? Linear probes for shape and colour.

    python benchmarks/linear_probe.py default --scenes 600

For every object of ``--scenes`` synthetic val scenes, the feature vector at the object's centre is
taken from each encoder tap (patch grid) and from the Shared FPN's pixel features; a linear
classifier (softmax regression, Adam) is fitted on 70% of the objects and scored on the rest, once
for the object's shape and once for its colour. The text is a neutral "the thing", so the features
describe the image, not the expression. Chance is 1/6 for both.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from sharedris import load_pretrained
from sharedris.data.synthetic import COLOURS, SHAPES, SyntheticRefScenes
from sharedris.data.transforms import image_to_tensor
from sharedris.text import Tokenizer


def _features(model, scenes: int) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray]:
    cfg = model.config
    g = cfg.encoder.grid_size
    tokenizer = Tokenizer(model.tokenizer_file, max_len=cfg.text_len)
    ids, pad = tokenizer(["the thing"])
    ds = SyntheticRefScenes("val", size=cfg.image_size, length=scenes)
    feats: dict[str, list[np.ndarray]] = {}
    shapes, colours = [], []
    with torch.inference_mode():
        for i in range(len(ds)):
            sample = ds[i]
            x = image_to_tensor(sample["image"], cfg.image_size, cfg.mean, cfg.std)[None]
            taps = model.encoder.forward_intermediates(x, ids, pad, model.taps)
            pixel = model.fpn(taps, pad, g, x).pixel[0]  # (C, h, w)
            maps = {f"tap {t}": v[0, 1:].T.reshape(-1, g, g) for t, (v, _) in zip(model.taps, taps)}
            maps["pixel"] = pixel
            for obj in sample["objects"]:
                cx, cy = obj["centre"]
                for name, fmap in maps.items():
                    stride = cfg.image_size / fmap.shape[-1]
                    r, c = (min(int(v // stride), fmap.shape[-1] - 1) for v in (cy, cx))
                    feats.setdefault(name, []).append(fmap[:, r, c].numpy())
                shapes.append(SHAPES.index(obj["shape"]))
                colours.append(list(COLOURS).index(obj["colour"]))
    return feats, np.array(shapes), np.array(colours)


def _probe(x: np.ndarray, y: np.ndarray, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier trained on the first 70% of the rows."""
    x_t, y_t = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    train = torch.arange(len(y)) < int(0.7 * len(y))
    x_t = (x_t - x_t[train].mean(0)) / (x_t[train].std(0) + 1e-5)
    torch.manual_seed(0)
    head = torch.nn.Linear(x_t.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(head(x_t[train]), y_t[train]).backward()
        opt.step()
    with torch.no_grad():
        return (head(x_t[~train]).argmax(1) == y_t[~train]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--scenes", type=int, default=600, help="val scenes to take objects from")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model).float().eval()
    feats, shapes, colours = _features(model, args.scenes)
    print(f"{args.model}: {len(shapes)} objects from {args.scenes} val scenes; chance 1/6 = 0.167")
    print(f"{'features':10} {'shape':>6} {'colour':>7}")
    for name, rows in feats.items():
        x = np.stack(rows)
        print(f"{name:10} {_probe(x, shapes):6.3f} {_probe(x, colours):7.3f}")


if __name__ == "__main__":
    main()
