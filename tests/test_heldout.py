"""The held-out renderer: deterministic, exact masks, expressions that resolve, variants as described."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

import sharedris
from sharedris.data.heldout import FOREIGN, GROUPS, KNOWN_WORDS, PALETTE, VARIANTS, HeldoutScenes
from sharedris.data.synthetic import COLOURS, SHAPES

N = 28  # samples per variant: every family 4 times
HARD = ("few", "lone", "crowded", "wide", "tall")  # variants drawn with hard edges, without JPEG
PLURAL = {s + "s": s for s in SHAPES}
BIG = {"big", "large", "bigger", "larger", "biggest", "largest"}
SMALL = {"small", "smaller", "smallest"}
SIDES = {"left": "left", "leftmost": "left", "right": "right", "rightmost": "right", "top": "top",
         "topmost": "top", "highest": "top", "bottom": "bottom", "lowest": "bottom"}


@pytest.fixture(scope="module")
def samples() -> dict[str, list[dict]]:
    return {v: [HeldoutScenes(v, N)[i] for i in range(N)] for v in VARIANTS}


def _all(samples, family=None, phrased_as=None):
    return [(v, s) for v, ss in samples.items() for s in ss
            if (family is None or s["family"] == family) and (phrased_as is None or s["phrased_as"] == phrased_as)]


def _words(text: str) -> list[str]:
    return text.split()


def _shape_of(word: str) -> str | None:
    return word if word in SHAPES else PLURAL.get(word)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        m = np.pad(mask, 1)
        mask = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask


def _eq_radius(obj: dict) -> float:
    return math.sqrt(obj["area"] / math.pi)


# ----------------------------------------------------------------------------------- determinism
def test_a_sample_depends_only_on_variant_seed_and_index():
    a, b = HeldoutScenes("pastel", 20), HeldoutScenes("pastel", 5)
    for i in (0, 3, 4):
        x, y = a[i], b[i]
        assert x["text"] == y["text"] and x["ann_ids"] == y["ann_ids"]
        assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
        assert np.array_equal(x["mask"], y["mask"])
    assert np.array_equal(np.asarray(a[-1]["image"]), np.asarray(a[19]["image"]))
    other_seed = HeldoutScenes("pastel", 5, seed=1)[3]
    assert other_seed["image"].size != a[3]["image"].size or not np.array_equal(
        np.asarray(other_seed["image"]), np.asarray(a[3]["image"]))
    other_variant = HeldoutScenes("jpeg", 5)[3]
    assert not np.array_equal(np.asarray(other_variant["image"]), np.asarray(a[3]["image"]))
    with pytest.raises(IndexError):
        a[20]
    with pytest.raises(ValueError, match="unknown held-out variant"):
        HeldoutScenes("huge")


def test_families_take_turns_and_few_skips_relation(samples):
    for v, ss in samples.items():
        groups = HeldoutScenes(v).groups
        assert groups == (tuple(g for g in GROUPS if g != "relation") if v == "few" else GROUPS)
        assert [s["family"] for s in ss] == [groups[i % len(groups)] for i in range(N)]
        assert all(s["group"] == s["family"] and s["variant"] == v for s in ss)


# ----------------------------------------------------------------------------------- masks and pixels
@pytest.mark.parametrize("variant", HARD)
def test_hard_edged_pixels_are_exactly_the_masks(samples, variant):
    for s in samples[variant]:
        image, labels = np.asarray(s["image"]), s["labels"]
        assert labels.shape == image.shape[:2] == s["mask"].shape
        for k, obj in enumerate(s["objects"]):
            on = labels == k + 1
            assert on.sum() == obj["area"] > 0
            assert (image[on] == obj["rgb"]).all()
            ys, xs = np.nonzero(on)
            assert obj["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # the drawn shape has the area of its equivalent disc (rasterising adds the boundary pixels)
            assert abs(obj["area"] / (math.pi * obj["radius"] ** 2) - 1) < (0.2 if obj["radius"] >= 8 else 0.45)
        assert (image[labels == 0] == s["background"]).all()
        assert np.array_equal(s["mask"], np.isin(labels, [k + 1 for k in s["ann_ids"]]))


def test_pastel_shapes_are_filled_inside_outlined_and_smooth(samples):
    darker = 0
    for s in samples["pastel"]:
        image, labels = np.asarray(s["image"]).astype(int), s["labels"]
        for k, obj in enumerate(s["objects"]):
            on = labels == k + 1
            inside = _erode(on, 7)  # the outline (<= 3 px) and its anti-aliasing stay nearer the edge
            assert (image[inside] == obj["rgb"]).all()
            darker += image[on].sum(axis=1).min() < 0.85 * sum(obj["rgb"])  # its darker outline
        away = _erode(labels == 0, 3)  # more than 3 px from every shape: untouched background
        assert away.any() and (image[away] == s["background"]).all()
        # anti-aliased: the edges have colours that are neither the fill, the outline nor the background
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 3 * len(s["objects"]) + 1
    assert darker >= 0.9 * sum(len(s["objects"]) for s in samples["pastel"])


def test_jpeg_scenes_keep_their_colours_on_a_gradient(samples):
    for s in samples["jpeg"]:
        image, labels = np.asarray(s["image"]).astype(int), s["labels"]
        for k, obj in enumerate(s["objects"]):
            inside = _erode(labels == k + 1, 3)
            if inside.sum() > 20:
                assert np.abs(image[inside].mean(axis=0) - obj["rgb"]).max() < 25
        background = image[labels == 0]
        assert s["background"] is None and np.ptp(background.mean(axis=1)) > 5


def test_backgrounds_are_not_mistaken_for_object_colours(samples):
    spread = min(max(rgb) - min(rgb) for rgb in PALETTE.values())
    for v, s in _all(samples):
        image, labels = np.asarray(s["image"]).astype(int), s["labels"]
        background = image[_erode(labels == 0, 2)]
        saturation = background.max(axis=1) - background.min(axis=1)
        if v == "jpeg":  # JPEG blocks carry some colour away from the shapes
            assert np.median(saturation) < spread / 4
        else:
            assert saturation.max() < spread / 2


# ----------------------------------------------------------------------------------- expressions
def test_in_vocabulary_families_use_only_known_words_and_unknown_word_does_not(samples):
    assert set(PALETTE) == set(COLOURS)
    assert not {w for words in FOREIGN.values() for w in words} & KNOWN_WORDS
    for _, s in _all(samples):
        unknown = [w for w in _words(s["text"]) if w not in KNOWN_WORDS]
        if s["family"] == "unknown_word":
            assert unknown and not s["mask"].any() and s["ann_ids"] == []
            assert s["unknown"] in unknown[0]
        else:
            assert unknown == [], s["text"]


def test_colour_shape_names_a_unique_pair(samples):
    for v, s in _all(samples, "colour_shape"):
        colour = next(w for w in _words(s["text"]) if w in COLOURS)
        shape = next(w for w in _words(s["text"]) if w in SHAPES)
        matching = [k for k, o in enumerate(s["objects"]) if (o["colour"], o["shape"]) == (colour, shape)]
        assert matching == s["ann_ids"] and len(matching) == 1
        if v == "lone":
            others = [o for k, o in enumerate(s["objects"]) if k != matching[0]]
            assert all(o["colour"] != colour and o["shape"] != shape for o in others)


def test_size_targets_differ_from_each_same_shape_object_by_1_7(samples):
    for v, s in _all(samples, "size"):
        words = _words(s["text"])
        shape = next(_shape_of(w) for w in words if _shape_of(w))
        (target,) = s["ann_ids"]
        assert s["objects"][target]["shape"] == shape
        others = [o for k, o in enumerate(s["objects"]) if o["shape"] == shape and k != target]
        assert 1 <= len(others) <= 2
        r = _eq_radius(s["objects"][target])
        if set(words) & BIG:
            assert all(r >= 1.7 * _eq_radius(o) for o in others), s["text"]
        else:
            assert set(words) & SMALL and all(1.7 * r <= _eq_radius(o) for o in others), s["text"]
        if "two" in words:
            assert len(others) == 1
        if v == "lone":
            colours = [o["colour"] for o in s["objects"]]
            assert len(set(colours)) == len(colours)


def test_position_targets_are_extreme_by_12_percent(samples):
    for _, s in _all(samples, "position"):
        words = _words(s["text"])
        shape = next(_shape_of(w) for w in words if _shape_of(w))
        side = next(SIDES[w] for w in words if w in SIDES)
        (target,) = s["ann_ids"]
        width, height = s["image"].size
        axis, extent = (0, width) if side in ("left", "right") else (1, height)
        sign = 1 if side in ("right", "bottom") else -1
        same = [k for k, o in enumerate(s["objects"]) if o["shape"] == shape]
        assert target in same and len(same) >= 2
        score = {k: sign * s["objects"][k]["centre"][axis] for k in same}
        runner_up = max(score[k] for k in same if k != target)
        assert score[target] - runner_up >= 0.12 * extent, s["text"]
        # the mask's own centroid agrees
        ys, xs = np.nonzero(s["mask"])
        centroid = (xs.mean(), ys.mean())[axis]
        assert abs(centroid - s["objects"][target]["centre"][axis]) < 0.05 * extent


def test_relation_targets_are_nearest_or_farthest_from_a_unique_anchor(samples):
    found = 0
    for _, s in _all(samples, "relation"):
        words = _words(s["text"])
        shape, anchor_colour, anchor_shape = words[1], words[-2], words[-1]
        anchors = [o for o in s["objects"] if (o["colour"], o["shape"]) == (anchor_colour, anchor_shape)]
        assert len(anchors) == 1 and anchor_shape != shape
        ax, ay = anchors[0]["centre"]
        dist = {k: math.hypot(o["centre"][0] - ax, o["centre"][1] - ay)
                for k, o in enumerate(s["objects"]) if o["shape"] == shape}
        (target,) = s["ann_ids"]
        others = [d for k, d in dist.items() if k != target]
        assert others
        short = min(s["image"].size)
        if {"closest", "nearest", "next"} & set(words):
            assert all(d - dist[target] >= 0.12 * short and d >= 1.25 * dist[target] for d in others), s["text"]
        else:
            assert {"farthest", "furthest"} & set(words)
            assert all(dist[target] - d >= 0.12 * short and dist[target] >= 1.25 * d for d in others), s["text"]
        found += 1
    assert found >= 4 * (len(VARIANTS) - 1)


def _group_of(s: dict) -> list[int]:
    """The objects a multi-target expression describes, read from its words."""
    words = _words(s["text"])
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((_shape_of(w) for w in words if _shape_of(w)), None)
    return [k for k, o in enumerate(s["objects"])
            if (colour is None or o["colour"] == colour) and (shape is None or o["shape"] == shape)]


def test_multi_target_refers_to_every_object_it_describes(samples):
    counts = {"both": 2, "two": 2, "three": 3, "four": 4}
    for _, s in _all(samples, "multi_target"):
        described = _group_of(s)
        assert s["ann_ids"] == described and 2 <= len(described) <= 4, s["text"]
        assert np.array_equal(s["mask"], np.isin(s["labels"], [k + 1 for k in described]))
        said = [counts[w] for w in _words(s["text"]) if w in counts]
        assert said in ([], [len(described)])


def test_no_target_expressions_name_nothing_in_the_scene(samples):
    seen = set()
    for _, s in _all(samples, "no_target"):
        assert not s["mask"].any() and s["ann_ids"] == []
        words, objs = _words(s["text"]), s["objects"]
        pairs = {(o["colour"], o["shape"]) for o in objs}
        shapes = {o["shape"] for o in objs}
        seen.add(s["phrased_as"])
        if s["phrased_as"] == "colour_shape":
            colour = next(w for w in words if w in COLOURS)
            shape = next(w for w in words if w in SHAPES)
            assert (colour, shape) not in pairs
        elif s["phrased_as"] in ("size", "position"):
            assert next(_shape_of(w) for w in words if _shape_of(w)) not in shapes
        else:
            assert s["phrased_as"] == "relation"
            assert (words[-2], words[-1]) not in pairs or words[1] not in shapes
    assert seen == {"colour_shape", "size", "position", "relation"}


# ----------------------------------------------------------------------------------- variants
def test_variant_counts_canvases_and_sizes(samples):
    counts = {"few": (1, 2), "lone": (2, 6), "crowded": (8, 10)}
    for v, s in _all(samples):
        lo, hi = counts.get(v, (2, 7))
        assert lo <= len(s["objects"]) <= hi
        width, height = s["image"].size
        if v == "wide":
            assert abs(width - 1.5 * height) <= 1 and 64 <= width <= 1600
        elif v == "tall":
            assert abs(width - 0.4 * height) <= 1 and 64 <= height <= 1600
        else:
            assert width == height and 128 <= width <= 512
        short = min(width, height)
        for o in s["objects"]:
            assert 0.045 <= _eq_radius(o) / short <= 0.16, (v, o)
    longs = [max(s["image"].size) for v in ("wide", "tall") for s in samples[v]]
    assert max(longs) / min(longs) > 3  # log-uniform over a wide range, not one size


def test_lone_targets_share_their_colour_with_nothing(samples):
    for s in samples["lone"]:
        if s["family"] in ("colour_shape", "size", "position", "relation"):
            (target,) = s["ann_ids"]
            colour = s["objects"][target]["colour"]
            assert [o["colour"] for o in s["objects"]].count(colour) == 1


def test_every_variant_builds_many_scenes():
    for v in VARIANTS:
        ds = HeldoutScenes(v, 400, seed=3)
        for i in range(0, 400, 7):
            assert ds[i]["image"].size[0] > 0


# ----------------------------------------------------------------------------------- wiring
def test_training_never_reads_the_heldout_renderer():
    from sharedris.config import ConfigError
    from sharedris.data.config import DataConfig
    from sharedris.data.registry import build_source
    from sharedris.train.config import TrainConfig, load_train_config

    with pytest.raises(ConfigError, match="for evaluation only"):
        load_train_config(None, ["data.synthetic_renderer=heldout"])
    with pytest.raises(ValueError, match="for evaluation only"):
        TrainConfig(data=DataConfig(synthetic_renderer="heldout"))
    with pytest.raises(ValueError, match="for evaluation only"):
        build_source(DataConfig(synthetic_renderer="heldout"), "train", train=True)
    with pytest.raises(ValueError, match="synthetic_renderer"):
        DataConfig(synthetic_renderer="other")
    source = build_source(DataConfig(synthetic_renderer="heldout", synthetic_heldout_variant="tall",
                                     synthetic_eval_size=9), "test", train=False)
    assert isinstance(source, HeldoutScenes) and source.variant == "tall" and len(source) == 9
    # nothing under train/ imports it, and it imports nothing of the generator but the vocabulary
    src = Path(sharedris.__file__).parent
    for path in (src / "train").rglob("*.py"):
        assert "heldout" not in path.read_text().replace("HELDOUT_FOR_EVALUATION_ONLY", ""), path
    imported = {node.module for node in ast.walk(ast.parse((src / "data" / "heldout.py").read_text()))
                if isinstance(node, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("sharedris")} == {
        "sharedris.data.synthetic", "sharedris.data.synthetic.families"}


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from sharedris.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_cli_scores_each_variant_like_a_split(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = _main(capsys, "eval", "--model", "default", "--dataset", "synthetic", "--renderer", "heldout",
                              "--variants", "few", "--num-samples", "14", "--out", str(out))
    assert code == 0, err
    rows = {line.split()[0] for line in stdout.splitlines()[2:]}
    groups = HeldoutScenes("few").groups
    assert rows == {"few", *(f"few/{g}" for g in groups)}
    report = json.loads(out.read_text())
    assert list(report) == ["few"] and report["few"]["num_samples"] == 14
    assert list(report["few"]["groups"]) == list(groups)
    assert report["few"]["groups"]["no_target"]["oIoU"] is None


@pytest.mark.parametrize("argv, needle", [
    (["--dataset", "refcoco"], "--dataset refcoco"),
    (["--split", "val"], "--split does not apply"),
    (["--styles", "plain"], "--styles does not apply"),
    (["--variants", "few,huge"], "unknown held-out variant(s) huge"),
])
def test_eval_cli_refuses_what_the_heldout_renderer_cannot_do(capsys, monkeypatch, argv, needle):
    import sharedris.cli

    monkeypatch.setattr(sharedris.cli, "_load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, _, err = _main(capsys, "eval", "--renderer", "heldout", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sharedris eval: error:") and needle in lines[0]
    code, _, err = _main(capsys, "eval", "--variants", "few")
    assert code == 2 and "--renderer heldout" in err
