"""gRefCOCO reader and `sharedris data check --dataset grefcoco` on a tiny generated tree.

The fixture is `write_refer_format` (64 px scenes) turned into gRefCOCO's files (docs/reference.md):
`grefcoco/grefs(unc).json` with list-valued `ann_id`/`category_id` and `no_target`, and edited to
hold each kind of ref: single-target, multi-target (with a crowd annotation the union must leave
out), no-target (`ann_id == [-1]`), a ref without sentences, and a `file_name` that names another
image (the image must come from `image_id` through `instances.json`).
"""

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_model import TINY_MODEL
from PIL import Image

from sharedris.cli import main
from sharedris.config import merge
from sharedris.data.config import DataConfig
from sharedris.data.refer import RefDataset, ReferError, decode_segmentation
from sharedris.data.registry import DATASETS, build_source
from sharedris.data.synthetic import write_refer_format
from sharedris.train.config import TrainConfig
from sharedris.train.loop import train

SIZE = 64
SPLITS = {"train": 3, "val": 3, "testA": 2, "testB": 2}
GREFS = "grefs(unc).json"


def _read(root: Path) -> tuple[dict, list[dict]]:
    ref_dir = root / "grefcoco"
    return json.loads((ref_dir / "instances.json").read_text()), json.loads((ref_dir / GREFS).read_text())


def _write(root: Path, instances: dict | None = None, grefs: list | None = None) -> None:
    if instances is not None:
        (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    if grefs is not None:
        (root / "grefcoco" / GREFS).write_text(json.dumps(grefs))


def _of_split(grefs: list[dict], split: str) -> list[dict]:
    return [g for g in grefs if g["split"] == split]


@pytest.fixture(scope="module")
def gref_root(tmp_path_factory) -> dict:
    """The generated tree and the ids of the refs each test looks at."""
    root = tmp_path_factory.mktemp("grefcoco")
    write_refer_format(root, splits=SPLITS, size=SIZE, seed=0)
    (root / "refcoco").rename(root / "grefcoco")
    with open(root / "grefcoco" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    (root / "grefcoco" / "refs(unc).p").unlink()
    instances = json.loads((root / "grefcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    grefs = [{**r, "ann_id": [r["ann_id"]], "category_id": [r["category_id"]], "no_target": False} for r in refs]
    val = _of_split(grefs, "val")

    # Multi-target: the ref's object, another object and a crowd region of the same image.
    multi = val[0]
    target = multi["ann_id"][0]
    other, crowd = [a["id"] for a in instances["annotations"]
                    if a["image_id"] == multi["image_id"] and a["id"] != target][:2]
    anns[crowd]["iscrowd"] = 1
    multi["ann_id"] = [target, other, crowd]
    multi["category_id"] = [anns[a]["category_id"] for a in multi["ann_id"]]

    # No target: ann_id [-1], category_id [-1], no_target true.
    no_target = val[1]
    no_target.update(ann_id=[-1], category_id=[-1], no_target=True)

    # A file_name naming another image that exists: only image_id may choose the file.
    misnamed = val[2]
    other_image = next(im for im in instances["images"] if im["id"] != misnamed["image_id"])
    misnamed["file_name"] = other_image["file_name"]

    # A ref without sentences, on a train image that has a ref with sentences.
    train0 = _of_split(grefs, "train")[0]
    spare = next(a["id"] for a in instances["annotations"]
                 if a["image_id"] == train0["image_id"] and a["id"] not in train0["ann_id"])
    sentenceless = {**train0, "ref_id": max(g["ref_id"] for g in grefs) + 1, "ann_id": [spare],
                    "category_id": [anns[spare]["category_id"]], "sentences": [], "sent_ids": []}
    grefs.append(sentenceless)
    _write(root, instances, grefs)
    return {"root": root, "multi": (multi["ref_id"], [target, other], crowd), "no_target": no_target["ref_id"],
            "misnamed": misnamed["ref_id"], "single": train0["ref_id"], "sentenceless": sentenceless["ref_id"]}


def _samples(ds: RefDataset) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def _of_ref(ds: RefDataset, ref_id: int) -> dict:
    return next(s for s in _samples(ds) if s["ref_id"] == ref_id)


def _mask(instances: dict, ann_id: int) -> np.ndarray:
    ann = next(a for a in instances["annotations"] if a["id"] == ann_id)
    return decode_segmentation(ann["segmentation"], SIZE, SIZE)


def _copy(gref_root: dict, tmp_path: Path) -> Path:
    shutil.copytree(gref_root["root"], tmp_path / "root")
    return tmp_path / "root"


# ------------------------------------------------------------------------------------ the reader
def test_every_split_has_one_sample_per_sentence(gref_root):
    _, grefs = _read(gref_root["root"])
    for split in SPLITS:
        ds = RefDataset(gref_root["root"], "grefcoco", split_by="unc", split=split)
        with_sentences = [g for g in _of_split(grefs, split) if g["sentences"]]
        assert len(ds) == sum(len(g["sentences"]) for g in with_sentences)
        assert ds.num_refs == len(with_sentences) == SPLITS[split]
        for s in _samples(ds):
            assert s["image"].mode == "RGB" and s["image"].size == (SIZE, SIZE)
            assert s["mask"].dtype == bool and s["mask"].shape == (SIZE, SIZE)
            assert isinstance(s["no_target"], bool) and all(isinstance(a, int) for a in s["ann_ids"])
            assert s["no_target"] == (s["ann_ids"] == []) == (not s["mask"].any())
            assert s["group"] == "" and s["split"] == split and isinstance(s["text"], str)


def test_no_target_expression_has_an_empty_mask(gref_root):
    ds = RefDataset(gref_root["root"], "grefcoco", split="val")
    sample = _of_ref(ds, gref_root["no_target"])
    assert sample["no_target"] is True and sample["ann_ids"] == []
    assert sample["mask"].shape == (SIZE, SIZE) and not sample["mask"].any()
    assert [s["no_target"] for s in _samples(ds)].count(True) == len(
        next(g for g in _read(gref_root["root"])[1] if g["ref_id"] == gref_root["no_target"])["sentences"])


def test_multi_target_mask_is_the_union_without_crowd(gref_root):
    instances, _ = _read(gref_root["root"])
    ref_id, kept, crowd = gref_root["multi"]
    sample = _of_ref(RefDataset(gref_root["root"], "grefcoco", split="val"), ref_id)
    union = _mask(instances, kept[0]) | _mask(instances, kept[1])
    assert (_mask(instances, kept[1]) & ~_mask(instances, kept[0])).any()  # both objects show
    assert (_mask(instances, crowd) & ~union).any()  # the crowd region would show if it were kept
    np.testing.assert_array_equal(sample["mask"], union)
    assert sample["ann_ids"] == kept and sample["no_target"] is False


def test_single_target_mask_is_its_annotation(gref_root):
    instances, grefs = _read(gref_root["root"])
    ref = next(g for g in grefs if g["ref_id"] == gref_root["single"])
    sample = _of_ref(RefDataset(gref_root["root"], "grefcoco", split="train"), ref["ref_id"])
    assert sample["ann_ids"] == ref["ann_id"] and sample["no_target"] is False
    np.testing.assert_array_equal(sample["mask"], _mask(instances, ref["ann_id"][0]))


def test_a_ref_without_sentences_gives_no_samples(gref_root):
    ds = RefDataset(gref_root["root"], "grefcoco", split="train")
    assert gref_root["sentenceless"] not in {s["ref_id"] for s in _samples(ds)}
    assert ds.num_refs == SPLITS["train"]


def test_the_image_comes_from_image_id_not_file_name(gref_root):
    instances, grefs = _read(gref_root["root"])
    ref = next(g for g in grefs if g["ref_id"] == gref_root["misnamed"])
    sample = _of_ref(RefDataset(gref_root["root"], "grefcoco", split="val"), ref["ref_id"])
    own = next(im["file_name"] for im in instances["images"] if im["id"] == ref["image_id"])
    assert own != ref["file_name"] and (gref_root["root"] / "images" / "train2014" / ref["file_name"]).is_file()
    expected = Image.open(gref_root["root"] / "images" / "train2014" / own).convert("RGB")
    np.testing.assert_array_equal(np.asarray(sample["image"]), np.asarray(expected))
    # The other refs' file_names carry the `_<ref_id>` suffix and name no file; they load too.
    suffixed = [g for g in grefs if re.search(r"_\d{12}_\d+\.jpg$", g["file_name"])]
    assert suffixed and not any((gref_root["root"] / "images" / "train2014" / g["file_name"]).exists()
                                for g in suffixed)


def test_a_pickled_grefs_file_is_read_first(gref_root, tmp_path):
    root = _copy(gref_root, tmp_path)
    _, grefs = _read(root)
    kept = [g for g in grefs if g["ref_id"] != gref_root["no_target"]]
    with open(root / "grefcoco" / "grefs(unc).p", "wb") as f:
        pickle.dump(kept, f, protocol=2)
    ds = RefDataset(root, "grefcoco", split="val")
    assert ds.num_refs == SPLITS["val"] - 1 and not any(s["no_target"] for s in _samples(ds))


@pytest.mark.parametrize("ann_id, no_target, needle", [
    ("none", False, "no_target is False but ann_id is [-1]"),
    ("own", True, "no_target is True but ann_id is"),
    ("mixed", False, "] mixes -1 (no target) with annotation ids"),
    ("empty", False, "ann_id is an empty list"),
])
def test_inconsistent_targets_are_refused(gref_root, tmp_path, ann_id, no_target, needle):
    root = _copy(gref_root, tmp_path)
    _, grefs = _read(root)
    ref = next(g for g in grefs if g["ref_id"] == gref_root["single"])
    ref["ann_id"] = {"none": [-1], "own": ref["ann_id"], "mixed": [-1, *ref["ann_id"]], "empty": []}[ann_id]
    ref["no_target"] = no_target
    _write(root, grefs=grefs)
    message = rf"ref {ref['ref_id']}: [^;]*{re.escape(needle)}.*data check .*--dataset grefcoco"
    with pytest.raises(ReferError, match=message):
        RefDataset(root, "grefcoco", split="train")


def test_a_multi_target_ref_of_crowd_regions_only_keeps_them(gref_root, tmp_path):
    root = _copy(gref_root, tmp_path)
    instances, grefs = _read(root)
    ref_id, kept, _ = gref_root["multi"]
    for ann in instances["annotations"]:
        if ann["id"] in kept:
            ann["iscrowd"] = 1
    ref = next(g for g in grefs if g["ref_id"] == ref_id)
    ref["ann_id"], ref["category_id"] = kept, ref["category_id"][:2]
    _write(root, instances, grefs)
    sample = _of_ref(RefDataset(root, "grefcoco", split="val"), ref_id)
    assert sample["ann_ids"] == kept
    np.testing.assert_array_equal(sample["mask"], _mask(instances, kept[0]) | _mask(instances, kept[1]))


def test_names_and_missing_files(gref_root, tmp_path):
    with pytest.raises(ValueError, match="train, val, testA, testB"):
        RefDataset(gref_root["root"], "grefcoco", split="test")
    with pytest.raises(ValueError, match="valid: unc"):
        RefDataset(gref_root["root"], "grefcoco", split_by="umd", split="val")
    root = _copy(gref_root, tmp_path)
    (root / "grefcoco" / GREFS).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape("grefcoco/grefs(unc).json does not exist")):
        RefDataset(root, "grefcoco", split="val")


def test_the_registry_builds_grefcoco(gref_root):
    assert "grefcoco" in DATASETS
    source = build_source(DataConfig(dataset="grefcoco", root=str(gref_root["root"])), "testB", train=False)
    assert isinstance(source, RefDataset) and source.dataset == "grefcoco" and source.split == "testB"


def test_training_runs_on_grefcoco(gref_root, tmp_path):
    # Masks only (no presence head yet): no-target expressions train towards the empty mask.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = train(merge(TrainConfig(), {
            "model": "sharedris_tiny", "model_overrides": TINY_MODEL, "batch_size": 2, "epochs": 1,
            "drop_path": 0.0, "amp": "none", "log_every": 1, "out_dir": str(tmp_path / "run"),
            "data": {"dataset": "grefcoco", "root": str(gref_root["root"]), "num_workers": 0},
        }), device="cpu")
    finally:
        torch.set_num_threads(threads)
    [metrics_file] = (out / "metrics").glob("epoch_*.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_samples"] == len(RefDataset(gref_root["root"], "grefcoco", split="val"))


# ------------------------------------------------------------------------------------ data check
def _table(stdout: str) -> dict[str, list[str]]:
    """The rows of the counts table, by split, as whitespace-separated cells."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines()
            if line.split() and line.split()[0] in (*SPLITS, "total")}


def test_data_check_counts_each_kind_of_expression(gref_root, capsys):
    main(["data", "check", "--root", str(gref_root["root"]), "--dataset", "grefcoco"])
    out = capsys.readouterr().out
    assert "grefcoco/unc" in out and GREFS in out and "no-target" in out and "multi-target" in out
    _, grefs = _read(gref_root["root"])
    sentences = {g["ref_id"]: len(g["sentences"]) for g in grefs}
    official_images = {"train": "~16,994", "val": "1,500*", "testA": "750*", "testB": "750*"}
    rows = _table(out)
    for split, n_refs in SPLITS.items():
        refs = [g for g in _of_split(grefs, split) if g["sentences"]]
        expressions = sum(len(g["sentences"]) for g in refs)
        no_target = sentences[gref_root["no_target"]] if split == "val" else 0
        multi = sentences[gref_root["multi"][0]] if split == "val" else 0
        # refs, images / official, expressions, no-target, multi-target
        assert rows[split] == [str(n_refs), str(n_refs), official_images[split], str(expressions),
                               str(no_target), str(multi)]
    total = sum(len(g["sentences"]) for g in grefs)
    assert rows["total"][2:4] == [str(total), "259,859*"]
    assert "note: 1 train refs have no sentences and give no samples" in out
    assert "ok:" in out


def test_data_check_lists_target_problems(gref_root, tmp_path, capsys):
    root = _copy(gref_root, tmp_path)
    _, grefs = _read(root)
    ref = next(g for g in grefs if g["ref_id"] == gref_root["single"])
    ref["no_target"] = True
    _write(root, grefs=grefs)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "check", "--root", str(root)])  # grefcoco/ is found without --dataset
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and f"ref {ref['ref_id']}: no_target is True but ann_id is" in out
