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

    python benchmarks/relation_breakdown.py default --terms

``--terms`` asks instead which part of the mask logit ranks the candidates: the logit at each
pixel of the decoder's map is the sum of a term from the pixel features, one from the coordinate
map (``decoder.coord_features``), one from the distance to the anchor point
(``decoder.anchor_point``) and a constant; each term is averaged over each candidate's pixels, and
the table gives, per term, how often it alone ranks the target first among the candidates and how
far apart (max - min, in logits) it puts them.
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
from sharedris.data.transforms import image_to_tensor
from sharedris.text import Tokenizer
from sharedris.train.config import load_train_config

TERMS = ("features", "coordinates", "anchor", "total")


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


def logit_terms(model: torch.nn.Module, tokenizer: Tokenizer, sample: dict[str, Any]) -> dict[str, torch.Tensor | None]:
    """The decoder's mask logits for ``sample`` split into :data:`TERMS`, (h, w) each at the decoder's
    resolution (None for a term the model lacks).

    Each term is what the logits lose when it is taken away: first the anchor point's (its weight a
    set to zero), then, from what is left, the coordinate map's (its output set to zero); the
    features' term is the rest less the constant bias.
    """
    cfg, decoder, seen = model.config, model.decoder, {}
    ids, pad = tokenizer([sample["text"]])
    image = image_to_tensor(sample["image"], cfg.image_size, cfg.mean, cfg.std)[None]
    hooks = [decoder.register_forward_hook(lambda mod, args, out: seen.update(logits=out[0][0, 0].float()))]

    def logits() -> torch.Tensor:
        model(image, ids, pad)
        return seen["logits"]

    def zero(module: torch.nn.Module) -> None:
        hooks.append(module.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)))

    try:
        rest = logits()
        terms: dict[str, torch.Tensor | None] = {"total": rest, "coordinates": None, "anchor": None}
        for name, part in (("anchor", decoder.bowl_mlp), ("coordinates", decoder.coord_proj)):
            if part is not None:
                zero(part)
                without = logits()
                terms[name], rest = rest - without, without
    finally:
        for hook in hooks:
            hook.remove()
    terms["features"] = rest - decoder.logit_bias
    return terms


def _term_rows(model: torch.nn.Module, scenes: Iterator[dict[str, Any]]) -> dict[str, list[tuple[float, ...]]]:
    """Per mode and number of candidates: for each scene, per term, whether it ranks the target first
    and its spread over the candidates."""
    tokenizer = Tokenizer(model.tokenizer_file, max_len=model.config.text_len)
    rows: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for sample in scenes:
        terms = logit_terms(model, tokenizer, sample)
        labels, target = torch.from_numpy(sample["labels"]), sample["target"]
        shape = sample["objects"][target]["shape"]
        candidates = [k for k, o in enumerate(sample["objects"]) if o["shape"] == shape]
        # each candidate's share of every cell of the decoder's map
        masks = torch.stack([(labels == k + 1).float() for k in candidates])[:, None]
        shares = torch.nn.functional.adaptive_avg_pool2d(masks, terms["total"].shape)[:, 0]  # (K, h, w)
        row = []
        for name in TERMS:
            if terms[name] is None:
                row += [np.nan, np.nan]
                continue
            means = (shares * terms[name]).sum((1, 2)) / shares.sum((1, 2)).clamp(min=1e-6)
            row += [float(means.argmax() == candidates.index(target)), float(means.max() - means.min())]
        rows[f"{relation_mode(sample['text'])}, {len(candidates)} candidates"].append(tuple(row))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint folder or 'default'")
    ap.add_argument("--scenes", type=int, default=400, help="relation scenes to score")
    ap.add_argument("--world", choices=WORLDS, default="flat", help="the val scenes' world (default: flat)")
    ap.add_argument("--recipe", help="a training config: score its last epoch's relation scenes instead of val's")
    ap.add_argument("--terms", action="store_true", help="which term of the mask logit ranks the candidates")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model).eval()
    scenes = relation_scenes(args.scenes, model.config.image_size, args.world, args.recipe)
    where = f"the last epoch of {args.recipe}" if args.recipe else f"{args.world}-world val"
    if args.terms:  # the model itself, in float32
        with torch.inference_mode():
            rows = _term_rows(model.float(), scenes)
        print(f"{args.model}: {sum(map(len, rows.values()))} relation scenes of {where}; per term of the mask "
              "logit, how often it alone ranks the target first / its spread over the candidates (logits)")
        print(f"{'mode':24} {'n':>4} " + " ".join(f"{name:>17}" for name in TERMS))
        for name in sorted(rows):
            r = np.array(rows[name]).mean(0)
            print(f"{name:24} {len(rows[name]):4d} " + " ".join(
                f"{'-':>17}" if np.isnan(r[2 * i]) else f"{r[2 * i]:8.2f} / {r[2 * i + 1]:6.2f}" for i in range(len(TERMS))))
        return
    predictor = Predictor(model)
    rows = defaultdict(list)
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
    print(f"{args.model}: {sum(map(len, rows.values()))} relation scenes of {where}; share of the mask's pixels on "
          "each object")
    print(f"{'mode':24} {'n':>4} {'IoU':>6} {'target':>7} {'others':>7} {'anchor':>7}")
    for name in sorted(rows):
        r = np.array(rows[name])
        print(f"{name:24} {len(r):4d} " + " ".join(f"{v:{w}.3f}" for v, w in zip(r.mean(0), (6, 7, 7, 7))))


if __name__ == "__main__":
    main()
