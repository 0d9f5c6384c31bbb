"""Tests for the varied synthetic world (compose + paint) and the text-free shortcut probe."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sharedris.data.config import DataConfig
from sharedris.data.registry import build_source
from sharedris.data.synthetic import COLOURS, MARGIN, SHAPES, SyntheticRefScenes
from sharedris.data.synthetic.compose import _with_unknown_word, made_up_word
from sharedris.data.synthetic.families import vocabulary
from sharedris.data.synthetic.geometry import UNNAMED_SHAPES, Spec, place
from sharedris.data.synthetic.paint import _coverage, _paint_object

SIZE = 128
WORDS = vocabulary()
_RELATION = re.compile(r" (?:closest to|next to|nearest to|farthest from|furthest from|far from) ")


def _scenes(family: str, n: int = 60, split: str = "test", seed: int = 3) -> SyntheticRefScenes:
    return SyntheticRefScenes(split, size=SIZE, length=n, seed=seed, families=[family], world="varied",
                              no_target_phrasings=["colour_shape", "size", "position", "relation", "multi_target"])


def _named(words: list[str]) -> tuple[str | None, str | None]:
    """The colour and shape a noun phrase names ("circles" counts as "circle")."""
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w.removesuffix("s") for w in words if w.removesuffix("s") in SHAPES), None)
    return colour, shape


def _matching(objects: list[dict[str, Any]], words: list[str]) -> list[int]:
    colour, shape = _named(words)
    return [i for i, o in enumerate(objects)
            if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]


def test_varied_scenes_are_deterministic_and_differ_from_the_flat_world() -> None:
    a, b = _scenes("colour_shape", 4), _scenes("colour_shape", 4)
    flat = SyntheticRefScenes("test", size=SIZE, length=4, seed=3, families=["colour_shape"])
    for i in range(4):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
        assert a[i]["text"] == b[i]["text"] and np.array_equal(a[i]["mask"], b[i]["mask"])
        assert not np.array_equal(np.asarray(a[i]["image"]), np.asarray(flat[i]["image"]))


def test_scenes_hold_1_to_10_objects_unnamed_shapes_and_targets_without_any_confuser() -> None:
    counts, lone, unnamed = Counter(), 0, 0
    for s in _scenes("colour_shape", 300):
        objs, t = s["objects"], s["target"]
        counts[len(objs)] += 1
        others = [o for k, o in enumerate(objs) if k != t]
        lone += all(o["colour"] != objs[t]["colour"] and o["shape"] != objs[t]["shape"] for o in others)
        unnamed += any(o["shape"] in UNNAMED_SHAPES for o in objs)
        assert not any(u in s["text"] for u in UNNAMED_SHAPES)
    assert min(counts) == 1 and max(counts) == 10 and len(counts) == 10
    assert lone >= 30 and unnamed >= 30


def test_colour_shape_and_position_expressions_pick_out_the_target() -> None:
    for s in _scenes("colour_shape"):
        assert _matching(s["objects"], s["text"].split()) == [s["target"]] == s["ann_ids"]
    directions = Counter()
    for s in _scenes("position", 80):
        objs, t, text = s["objects"], s["target"], s["text"]
        cands = [k for k, o in enumerate(objs) if o["shape"] == objs[t]["shape"]]
        xy = {k: np.array(objs[k]["centre"]) for k in cands}
        for word, key in (("left", lambda k: xy[k][0]), ("right", lambda k: -xy[k][0]),
                          ("top", lambda k: xy[k][1]), ("highest", lambda k: xy[k][1]),
                          ("bottom", lambda k: -xy[k][1]), ("lowest", lambda k: -xy[k][1])):
            if re.search(rf"\b{word}(most)?\b", text):
                directions[word] += 1
                assert min(key(k) for k in cands if k != t) - key(t) >= MARGIN * SIZE - 1e-6
    assert len(directions) >= 4


def test_multi_target_masks_are_every_object_of_the_named_kind() -> None:
    sizes = set()
    for s in _scenes("multi_target"):
        assert sorted(_matching(s["objects"], s["text"].split())) == sorted(s["targets"])
        labels = np.isin(s["labels"], [t + 1 for t in s["targets"]])
        assert np.array_equal(labels, s["mask"])
        sizes.add(len(s["targets"]))
    assert min(sizes) == 2 and max(sizes) >= 4


def test_no_target_expressions_refer_to_nothing_in_the_scene() -> None:
    unknown = near_miss = 0
    for s in _scenes("no_target", 200):
        assert s["no_target"] and not s["mask"].any() and s["targets"] == []
        words = s["text"].split()
        if any(w not in WORDS for w in words):  # a word from outside the world
            unknown += 1
            assert sum(w not in WORDS for w in words) == 1
            continue
        head, *anchor = _RELATION.split(s["text"])
        missing_head = not _matching(s["objects"], head.split())
        assert missing_head or (anchor and not _matching(s["objects"], anchor[0].split()))
        colour, shape = _named(head.split())
        near_miss += any(o["colour"] == colour or o["shape"] == shape for o in s["objects"])
    assert 20 <= unknown <= 90 and near_miss >= 60


def test_unknown_words_replace_one_content_word_with_one_outside_the_vocabulary() -> None:
    rng = np.random.default_rng(0)
    for text in ("the red circle", "all the blue stars", "the small square", "the circle closest to the green star"):
        for _ in range(20):
            new = _with_unknown_word(rng, text)
            changed = [(a, b) for a, b in zip(text.split(), new.split()) if a != b]
            assert len(changed) == 1 and changed[0][1] not in WORDS
            if changed[0][0] in {shape + "s" for shape in SHAPES}:  # a plural stays plural
                assert changed[0][1].endswith("s")
    assert _with_unknown_word(rng, "the one on the left") is None  # no colour, shape or size word
    assert all(made_up_word(rng) not in WORDS for _ in range(200))


def test_painting_touches_only_the_objects_pixels() -> None:
    rng = np.random.default_rng(1)
    specs = [Spec(s, c, 14.0) for s, c in zip(("star", "cross", "circle"), ("red", "blue", "yellow"))]
    objs, labels = place(specs, SIZE, rng, stretch=(1.6, 1 / 1.6))
    for antialias in (False, True):
        canvas = np.full((SIZE, SIZE, 3), 77.0, dtype=np.float32)
        for k, o in enumerate(objs):
            _paint_object(canvas, labels, k + 1, o, rng, antialias)
        changed = (canvas != 77.0).any(axis=2)
        if antialias:  # coverage may spill into the one-pixel ring around each mask
            grown = np.zeros_like(changed)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    grown |= np.roll(labels > 0, (dy, dx), axis=(0, 1))
            assert not (changed & ~grown).any()
        else:
            assert not (changed & (labels == 0)).any()
            assert changed[labels > 0].mean() > 0.95
    for k, o in enumerate(objs):  # supersampled coverage adds up to the hard raster's area
        x, y, w, h = o.bbox
        alpha = _coverage(o.polygon, x - 1, y - 1, x + w + 1, y + h + 1)
        assert alpha.sum() == pytest.approx((labels == k + 1).sum(), rel=0.06)


def test_training_takes_the_varied_world_by_default_and_refuses_an_unknown_one() -> None:
    source = build_source(DataConfig(synthetic_train_size=4), "train", train=True)
    assert source.world == "varied" and "among unnamed crosses, arrows or hearts" in source.description
    with pytest.raises(ValueError, match="unknown world"):
        SyntheticRefScenes("train", length=2, world="cartoon")
    with pytest.raises(ValueError, match="no_target_phrasings"):
        SyntheticRefScenes("train", length=2, no_target_phrasings=["multi_target"])  # flat world: not allowed


def _circle_aspects(source: SyntheticRefScenes) -> list[float]:
    """Width over height of every circle's polygon: 1 unless the scene was stretched."""
    aspects = []
    for sample in source:
        for o in sample["objects"]:
            if o["shape"] == "circle":
                xy = np.asarray(o["polygon"]).reshape(-1, 2)
                w, h = xy.max(0) - xy.min(0)
                aspects.append(float(w / h))
    return aspects


def test_a_training_recipe_sets_how_often_and_how_far_scenes_are_stretched() -> None:
    def train_source(stretch: tuple[float, float]) -> SyntheticRefScenes:
        return build_source(DataConfig(synthetic_train_size=150, synthetic_image_size=SIZE, synthetic_stretch=stretch,
                                       synthetic_train_families=("colour_shape",)), "train", train=True)

    never, always = _circle_aspects(train_source((0.0, 3.0))), _circle_aspects(train_source((1.0, 3.0)))
    assert len(never) >= 40 and len(always) >= 40
    assert all(abs(a - 1) < 0.02 for a in never)
    assert sum(abs(a - 1) > 0.05 for a in always) > 0.9 * len(always)
    assert max(max(a, 1 / a) for a in always) > 2.5 and all(1 / 3.05 < a < 3.05 for a in always)
    # evaluation splits keep the world's own stretch whatever the recipe says
    cfg = DataConfig(synthetic_eval_size=6, synthetic_stretch=(1.0, 3.0))
    stretched, own = build_source(cfg, "val", train=False), build_source(DataConfig(synthetic_eval_size=6), "val", train=False)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(stretched, own))
    with pytest.raises(ValueError, match="synthetic_stretch"):
        DataConfig(synthetic_stretch=(0.5, 0.8))


def _candidates(source: SyntheticRefScenes) -> Counter[int]:
    """How many scenes have each number of objects of the target's shape (relation scenes)."""
    counts: Counter[int] = Counter()
    for sample in source:
        shape = sample["objects"][sample["target"]]["shape"]
        counts[sum(o["shape"] == shape for o in sample["objects"])] += 1
    return counts


def test_a_training_recipe_sets_how_many_candidates_constructed_relation_scenes_hold() -> None:
    def train_source(candidates: tuple[int, int]) -> SyntheticRefScenes:
        return build_source(DataConfig(synthetic_train_size=80, synthetic_image_size=SIZE,
                                       synthetic_relation_candidates=candidates,
                                       synthetic_train_families=("relation",)), "train", train=True)

    own, four = _candidates(train_source((2, 3))), _candidates(train_source((4, 4)))
    # constructed scenes (half of them) hold exactly the candidates drawn; independent ones any number
    assert four[4] >= 25 and four[4] > 2 * own[4]
    assert own[2] + own[3] >= 50 and four[2] + four[3] < own[2] + own[3] - 20
    # the default draws the scenes as before the option existed: the same training scenes
    default = build_source(DataConfig(synthetic_train_size=5, synthetic_image_size=SIZE,
                                      synthetic_train_families=("relation",)), "train", train=True)
    assert [x["text"] for x in default] == [x["text"] for x in train_source((2, 3))][:5]
    # evaluation splits keep the world's own candidates whatever the recipe says
    cfg = DataConfig(synthetic_eval_size=12, synthetic_relation_candidates=(4, 4))
    more, own_val = build_source(cfg, "val", train=False), build_source(DataConfig(synthetic_eval_size=12), "val", train=False)
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(more, own_val))
    for bad in ((1, 3), (3, 2), (2, 5)):
        with pytest.raises(ValueError, match="synthetic_relation_candidates"):
            DataConfig(synthetic_relation_candidates=bad)
    with pytest.raises(ValueError, match="relation_candidates"):
        SyntheticRefScenes("train", length=2, world="varied", relation_candidates=(2, 5))


def _probe_module() -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shortcut_probe.py"
    import sys

    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("shortcut_probe", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_the_probe_finds_a_planted_shortcut_and_none_in_the_varied_world() -> None:
    probe = _probe_module()
    scenes = SyntheticRefScenes("train", size=64, length=1200, seed=0, world="varied",
                                families=["colour_shape", "multi_target", "no_target"],
                                no_target_phrasings=["colour_shape", "multi_target"])
    features, has_target = probe.collect(scenes, len(scenes))
    assert max(probe.probe_auc(features, has_target).values()) < 0.6
    planted = features.copy()
    planted[~has_target, 0] += 1  # scenes without a target hold one object more
    assert max(probe.probe_auc(planted, has_target).values()) > 0.9


def _eval(capsys, *argv: str) -> tuple[int, str, str]:
    from sharedris.cli import main

    try:
        main(["eval", *argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_scores_the_varied_world_unless_told_flat(tmp_path, capsys) -> None:
    reports = {}
    for world in ("varied", "flat"):
        out = tmp_path / f"{world}.json"
        argv = ["--num-samples", "6", "--out", str(out)] + (["--world", world] if world == "flat" else [])
        code, _, err = _eval(capsys, *argv)
        assert code == 0, err
        reports[world] = json.loads(out.read_text())
    assert reports["varied"] != reports["flat"] and reports["varied"]["num_samples"] == 6
    code, _, err = _eval(capsys, "--styles", "plain")  # flat-world backgrounds asked of the varied world
    assert code == 2 and "add --world flat" in err and len(err.strip().splitlines()) == 1
