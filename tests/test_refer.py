"""RefCOCO-family reader, `sharedris data check`, and eval/train through it, on tiny generated fixtures.

The fixture is `write_refer_format` (64 px, 3 train / 2 val / 2 testA / 2 testB scenes), edited to
hold what the real files hold: overlapping polygons, a degenerate polygon, compressed and
uncompressed RLE, multi-sentence refs, refs whose `file_name` names no file.
"""

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_model import TINY_MODEL
from PIL import Image
from pycocotools import mask as mask_utils

from sharedris.cli import main
from sharedris.config import merge
from sharedris.data.config import DataConfig
from sharedris.data.registry import build_source
from sharedris.data.refer import RefDataset, ReferError, decode_segmentation, load_refs
from sharedris.data.synthetic import write_refer_format
from sharedris.modeling.pretrained import save_pretrained
from sharedris.modeling.registry import build_model, model_config
from sharedris.train.config import TrainConfig
from sharedris.train.loop import train

SIZE = 64
SPLITS = {"train": 3, "val": 2, "testA": 2, "testB": 2}
LATIN1_MARKER = "LATIN1PLACEHOLDER"


def _read(root: Path) -> tuple[dict, list[dict]]:
    instances = json.loads((root / "refcoco" / "instances.json").read_text())
    with open(root / "refcoco" / "refs(unc).p", "rb") as f:
        return instances, pickle.load(f)


def _write(root: Path, instances: dict | None = None, refs: list | None = None, protocol: int = 2) -> None:
    if instances is not None:
        (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    if refs is not None:
        with open(root / "refcoco" / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=protocol)


def _ann(instances: dict, ann_id: int) -> dict:
    return next(a for a in instances["annotations"] if a["id"] == ann_id)


def _refs_of(refs: list[dict], split: str) -> list[dict]:
    return [r for r in refs if r["split"] == split]


def _poly_mask(polygons: list[list[float]]) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, SIZE, SIZE))).astype(bool)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.ravel(order="F").astype(np.uint8)  # COCO runs go down columns and start with zeros
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [SIZE, SIZE], "counts": counts}


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> dict:
    """The edited fixture and, per edit, the ref it concerns and the mask it must decode to."""
    root = tmp_path_factory.mktemp("refer")
    write_refer_format(root, splits=SPLITS, size=SIZE, seed=0)
    instances, refs = _read(root)
    val, test_a = _refs_of(refs, "val"), _refs_of(refs, "testA")
    expect: dict[str, tuple[int, np.ndarray]] = {}

    # Two overlapping polygons: the mask is their union (summing would give 2 on the overlap).
    ann = _ann(instances, val[0]["ann_id"])
    p1 = ann["segmentation"][0]
    p2 = [v + 5 if i % 2 == 0 else v for i, v in enumerate(p1)]
    ann["segmentation"] = [p1, p2]
    expect["overlap"] = (val[0]["ref_id"], _poly_mask([p1]) | _poly_mask([p2]))
    assert ((_poly_mask([p1]).astype(int) + _poly_mask([p2])) == 2).any()

    # A degenerate polygon (< 6 numbers) is ignored.
    ann = _ann(instances, val[1]["ann_id"])
    expect["degenerate"] = (val[1]["ref_id"], _poly_mask(ann["segmentation"]))
    ann["segmentation"].append([10.0, 10.0, 30.0, 30.0])

    # Compressed (string counts) and uncompressed (list counts) RLE of the polygon mask.
    for ref, kind in zip(test_a, ("rle_compressed", "rle_uncompressed")):
        ann = _ann(instances, ref["ann_id"])
        m = _poly_mask(ann["segmentation"])
        if kind == "rle_compressed":
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        else:
            ann["segmentation"] = _uncompressed_rle(m)
        expect[kind] = (ref["ref_id"], m)
    # A non-referred annotation in RLE too (the index must not trip over it).
    other = next(a for a in instances["annotations"] if a["id"] not in {r["ann_id"] for r in refs})
    other["segmentation"] = _uncompressed_rle(_poly_mask(other["segmentation"]))

    # A three-sentence ref; refs' file_name never names a file (real refs carry a `_<n>` suffix).
    next_sent = max(s["sent_id"] for r in refs for s in r["sentences"]) + 1
    train0 = _refs_of(refs, "train")[0]
    train0["sentences"] = [train0["sentences"][0], *(
        {"sent_id": next_sent + k, "tokens": ["extra", str(k)], "raw": f"Extra {k}", "sent": f"extra {k}"}
        for k in range(2))]
    train0["sent_ids"] = [s["sent_id"] for s in train0["sentences"]]
    for r in refs:
        r["file_name"] = r["file_name"].replace(".jpg", "_999.jpg")
    _write(root, instances, refs)
    return {"root": root, "expect": expect, "multi_ref": train0["ref_id"]}


def _sample_of_ref(ds: RefDataset, ref_id: int) -> dict:
    return next(s for s in (ds[i] for i in range(len(ds))) if s["ref_id"] == ref_id)


def _copy(refer_root: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(refer_root["root"], dst)
    return dst


# ------------------------------------------------------------------------------------ the reader
def test_every_split_has_one_sample_per_sentence(refer_root):
    _, refs = _read(refer_root["root"])
    for split in SPLITS:
        ds = RefDataset(refer_root["root"], "refcoco", split=split)
        split_refs = _refs_of(refs, split)
        assert len(ds) == sum(len(r["sentences"]) for r in split_refs)
        assert ds.num_refs == len(split_refs) == SPLITS[split]
        for i in range(len(ds)):
            s = ds[i]
            assert s["image"].mode == "RGB" and s["image"].size == (SIZE, SIZE)
            assert s["mask"].dtype == bool and s["mask"].shape == (SIZE, SIZE) and s["mask"].any()
            assert isinstance(s["text"], str) and s["group"] == "" and s["split"] == split
    train_ds = RefDataset(refer_root["root"], "refcoco", split="train")
    texts = [train_ds[i]["text"] for i in range(len(train_ds)) if train_ds[i]["ref_id"] == refer_root["multi_ref"]]
    assert len(texts) == 3 and texts[1:] == ["Extra 0", "Extra 1"]


def test_text_field_picks_raw_or_sent(refer_root):
    raw = RefDataset(refer_root["root"], split="train")[0]["text"]
    sent = RefDataset(refer_root["root"], split="train", text_field="sent")[0]["text"]
    assert sent == raw.lower()
    with pytest.raises(ValueError, match="text_field"):
        RefDataset(refer_root["root"], split="train", text_field="tokens")


@pytest.mark.parametrize("case", ["overlap", "degenerate", "rle_compressed", "rle_uncompressed"])
def test_masks_decode_polygons_and_rle(refer_root, case):
    ref_id, expected = refer_root["expect"][case]
    split = "val" if case in ("overlap", "degenerate") else "testA"
    mask = _sample_of_ref(RefDataset(refer_root["root"], split=split), ref_id)["mask"]
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_decode_segmentation_rejects_malformed_rle():
    with pytest.raises(ValueError, match="size"):
        decode_segmentation({"size": [8, 9], "counts": [72]}, 8, 8)
    with pytest.raises(ValueError, match="sum"):
        decode_segmentation({"size": [8, 8], "counts": [10, 200]}, 8, 8)  # would write past the mask
    with pytest.raises(ValueError):
        decode_segmentation("not a segmentation", 8, 8)
    assert not decode_segmentation([[1, 2, 3, 4]], 8, 8).any()  # only degenerate polygons: empty


@pytest.mark.parametrize("dataset, split_by, split, needle", [
    ("refcocoz", None, "val", "refcoco, refcoco+, refcocog"),
    ("refcoco", "umd", "val", "valid: unc"),
    ("refcoco", None, "test", "train, val, testA, testB"),
    ("refcocog", None, "testA", "train, val, test"),
    ("refcocog", "google", "test", "train, val"),
])
def test_wrong_names_list_the_valid_ones(refer_root, dataset, split_by, split, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        RefDataset(refer_root["root"], dataset, split_by=split_by, split=split)


def test_missing_root_and_dataset_folder_are_clear(tmp_path, refer_root):
    with pytest.raises(FileNotFoundError, match="nowhere.*--root"):
        RefDataset(tmp_path / "nowhere", split="val")
    with pytest.raises(FileNotFoundError, match=r"refcocog.*refs\(umd\)\.p"):
        RefDataset(refer_root["root"], "refcocog", split="val")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refs_pickle_protocols(refer_root, tmp_path, protocol):
    root = _copy(refer_root, tmp_path)
    _, refs = _read(root)
    _write(root, refs=refs, protocol=protocol)
    assert len(RefDataset(root, split="train")) == sum(len(r["sentences"]) for r in _refs_of(refs, "train"))


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload, name", [(_RunsShell, "system"), (_RunsEval, r"(__builtin__|builtins)\.eval")])
def test_a_pickle_that_imports_anything_is_refused(refer_root, tmp_path, payload, name):
    root = _copy(refer_root, tmp_path)
    marker = tmp_path / "pwned"
    _, refs = _read(root)
    refs[0]["sentences"][0]["raw"] = payload(marker)
    _write(root, refs=refs)
    with pytest.raises(ReferError, match=f"refuses to load.*it tries to import .*{name}"):
        RefDataset(root, split="train")
    assert not marker.exists()


def test_python2_latin1_strings_load(refer_root, tmp_path):
    root = _copy(refer_root, tmp_path)
    _, refs = _read(root)
    ref = _refs_of(refs, "val")[0]
    ref["sentences"][0]["raw"] = LATIN1_MARKER
    data = pickle.dumps(refs, protocol=2)
    # Python 3 writes str as BINUNICODE; Python 2 wrote its byte str as SHORT_BINSTRING ('U').
    py3 = b"X" + struct.pack("<I", len(LATIN1_MARKER)) + LATIN1_MARKER.encode()
    py2 = "the café table".encode("latin1")
    assert data.count(py3) == 1
    (root / "refcoco" / "refs(unc).p").write_bytes(data.replace(py3, b"U" + bytes([len(py2)]) + py2))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads((root / "refcoco" / "refs(unc).p").read_bytes())
    assert any(s["raw"] == "the café table" for r in load_refs(root / "refcoco" / "refs(unc).p")
               for s in r["sentences"])
    assert _sample_of_ref(RefDataset(root, split="val"), ref["ref_id"])["text"] == "the café table"


def _image_of_first(root: Path, split: str) -> tuple[RefDataset, Path]:
    ds = RefDataset(root, split=split)
    instances, _ = _read(root)
    file_name = next(im["file_name"] for im in instances["images"] if im["id"] == ds[0]["image_id"])
    return ds, root / "images" / "train2014" / file_name


def test_missing_image_names_the_file_and_the_fix(refer_root, tmp_path):
    root = _copy(refer_root, tmp_path)
    ds, path = _image_of_first(root, "val")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"{path.name}.*--root"):
        ds[0]


def test_image_size_mismatch_names_the_file(refer_root, tmp_path):
    root = _copy(refer_root, tmp_path)
    ds, path = _image_of_first(root, "val")
    Image.new("RGB", (SIZE - 4, SIZE)).save(path)
    with pytest.raises(ReferError, match=f"{path.name} is 60x64 but instances.json says 64x64"):
        ds[0]


def test_inconsistent_refs_are_refused_at_build_time(refer_root, tmp_path):
    root = _copy(refer_root, tmp_path)
    _, refs = _read(root)
    _refs_of(refs, "val")[0]["ann_id"] = 10**6
    _write(root, refs=refs)
    with pytest.raises(ReferError, match="annotation 1000000 is not in .*data check"):
        RefDataset(root, split="val")


def test_build_source_needs_a_root(refer_root, monkeypatch):
    monkeypatch.delenv("SHAREDRIS_DATA", raising=False)
    with pytest.raises(ValueError, match="set data.root or SHAREDRIS_DATA"):
        build_source(DataConfig(dataset="refcoco"), "val", train=False)
    monkeypatch.setenv("SHAREDRIS_DATA", str(refer_root["root"]))
    source = build_source(DataConfig(dataset="refcoco"), "testB", train=False)
    assert isinstance(source, RefDataset) and source.split == "testB"
    with pytest.raises(ValueError, match="testA, testB"):
        build_source(DataConfig(dataset="refcoco"), "test", train=False)


# ------------------------------------------------------------------------------------ data check
def _sharedris(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sharedris", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_data_check_passes_on_a_good_root(refer_root):
    result = _sharedris("data", "check", "--root", str(refer_root["root"]))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refcoco/unc" in result.stdout and "42,404*" in result.stdout  # official count, flagged
    assert "ok:" in result.stdout


def test_data_check_lists_every_problem_and_exits_2(refer_root, tmp_path):
    root = _copy(refer_root, tmp_path)
    _, missing = _image_of_first(root, "val")
    _, garbage = _image_of_first(root, "testB")
    missing.unlink()
    garbage.write_bytes(b"not an image")
    shutil.copytree(root / "refcoco", root / "refcoco+")
    (root / "refcoco+" / "instances.json").write_text('{"images": [')
    result = _sharedris("data", "check", "--root", str(root))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "3 problem(s):" in result.stdout
    assert f"{missing.name} is missing" in result.stdout
    assert f"{garbage.name} cannot be read" in result.stdout
    assert "refcoco+/instances.json is not valid COCO instances JSON" in result.stdout
    assert "sharedris data: error: 3 problem(s)" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ eval and train
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_cli_reports_each_split(refer_root, tmp_path, capsys):
    cfg = model_config("sharedris_tiny", **TINY_MODEL)
    torch.manual_seed(0)
    folder = save_pretrained(build_model(cfg), tmp_path / "ckpt")
    out = tmp_path / "metrics.json"
    main(["eval", "--model", str(folder), "--dataset", "refcoco", "--root", str(refer_root["root"]),
          "--split", "val,testA,testB", "--protocol", "resized", "--batch-size", "4", "--out", str(out)])
    table = capsys.readouterr().out
    rows = [line.split()[0] for line in table.splitlines()[2:]]
    assert rows == ["val", "testA", "testB"]
    report = json.loads(out.read_text())
    assert set(report) == {"val", "testA", "testB"}
    assert report["testA"]["num_samples"] == len(RefDataset(refer_root["root"], split="testA"))
    assert report["val"]["protocol"] == "resized480" and 0 <= report["val"]["overall"]["oIoU"] <= 1

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(folder), "--dataset", "refcoco", "--root", str(refer_root["root"]),
              "--split", "test"])
    assert exit_info.value.code == 2
    assert "valid splits: train, val, testA, testB" in capsys.readouterr().err


def _train_cfg(root: Path, out: Path, **data) -> TrainConfig:
    return merge(TrainConfig(), {
        "model": "sharedris_tiny", "model_overrides": TINY_MODEL, "batch_size": 2, "epochs": 1,
        "drop_path": 0.0, "amp": "none", "log_every": 1, "out_dir": str(out),
        "data": {"dataset": "refcoco", "root": str(root), "num_workers": 0, **data},
    })


def test_training_runs_on_refcoco(refer_root, tmp_path):
    out = train(_train_cfg(refer_root["root"], tmp_path / "run"), device="cpu")
    [metrics_file] = (out / "metrics").glob("epoch_*.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["split"] == "val"
    assert metrics["num_samples"] == len(RefDataset(refer_root["root"], split="val"))
    assert (out / "best" / "config.json").is_file() and (out / "final" / "model.safetensors").is_file()


def test_training_refuses_a_test_split_for_validation(refer_root, tmp_path):
    with pytest.raises(ValueError, match="test split"):
        train(_train_cfg(refer_root["root"], tmp_path / "run", val_split="testA"), device="cpu")
    assert not (tmp_path / "run").exists()
