"""Bulk prediction (`sharedris predict --manifest`, folders, globs, `predict_manifest`): every good pair
once in manifest order, bad rows in errors.jsonl, resume after a kill, the same output under torchrun,
"no match" pairs marked and without mask files."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_model import save_tiny_model, scene

import sharedris
from sharedris.bulk import BadRow, ManifestError, Row, default_lanes, default_workers, predict_manifest, read_manifest
from sharedris.modeling.pretrained import load_pretrained
from sharedris.predictor import Predictor
from sharedris.render import encode_rle

TORCHRUN = Path(sys.executable).with_name("torchrun")
TEXTS = ["the red box", "the left one"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as in the subprocesses (OMP_NUM_THREADS=1), so that in-process reference
    runs use the same kernels as the command line."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp32(model_dir):
    return Predictor(load_pretrained(model_dir), precision="fp32")


def _write_dataset(root: Path, good_rows: int) -> tuple[Path, list[int]]:
    """``good_rows`` rows of 2 expressions on small PNGs, with 10 bad rows spread among them.

    Returns the manifest and the line numbers of the bad rows.
    """
    (root / "img").mkdir(parents=True)
    (root / "img" / "notes.png").write_text("not an image\n")  # unreadable image file
    bad = [
        "{\"image\": \"img/0.png\", \"texts\": [\"the red",  # malformed JSON
        "not json at all",  # malformed JSON
        json.dumps([1, 2]),  # not an object
        json.dumps({"image": "img/missing.png", "texts": TEXTS}),  # missing image
        json.dumps({"image": "/nonexistent/dir/x.png", "texts": TEXTS}),  # missing image
        json.dumps({"image": "img/notes.png", "texts": TEXTS}),  # unreadable image
        json.dumps({"image": "img/1.png", "texts": ["the box", ""]}),  # empty text
        json.dumps({"image": "img/1.png", "texts": "   "}),  # blank text
        json.dumps({"image": "img/2.png"}),  # no texts
        json.dumps({"texts": TEXTS}),  # no image
    ]
    lines, bad_lines = [], []
    every = max(1, good_rows // len(bad))
    for i in range(good_rows):
        scene(24 + i % 5, 16 + i % 3, seed=i).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"image": f"img/{i}.png", "texts": TEXTS}))
        if i % every == every // 2 and len(bad_lines) < len(bad):
            lines.append(bad[len(bad_lines)])
            bad_lines.append(len(lines))
    assert len(bad_lines) == len(bad)
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, bad_lines


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sharedris", "predict", *args]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------- manifests
def test_manifest_rows_are_checked_one_by_one(tmp_path):
    manifest, bad_lines = _write_dataset(tmp_path, good_rows=20)
    rows = read_manifest(manifest).rows
    bad = [r for r in rows if isinstance(r, BadRow)]
    assert [r.line for r in bad] == bad_lines[:3] + bad_lines[6:]  # image problems show up only when decoding
    assert all(r.reason and "\n" not in r.reason for r in bad)
    with pytest.raises(ManifestError, match="unknown format"):
        read_manifest(tmp_path / "img" / "0.png")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


def test_duplicate_ids_are_bad_rows():
    rows = read_manifest([{"image": "a.png", "texts": ["x"], "id": "a"}, {"image": "b.png", "texts": ["y"], "id": "a"},
                          {"image": "c.png", "texts": ["z"], "id": 1}, {"image": "d.png", "texts": ["w"]}]).rows
    assert rows[1].reason == "id 'a' is already used by line 1; ids must be unique"
    assert isinstance(rows[2], Row) and rows[2].id == 1
    assert isinstance(rows[3], Row) and rows[3].id == 4  # no id: the line number


# -------------------------------------------------------------------------------- kill + resume
@pytest.mark.slow
def test_sigkill_midway_then_rerun_writes_every_good_pair_once(tmp_path, model_dir, fp32):
    manifest, bad_lines = _write_dataset(tmp_path, good_rows=160)  # 320 good pairs, 10 bad rows
    summary = predict_manifest(fp32, manifest, tmp_path / "reference", batch_size=8, workers=0, show_progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (320, 0, 10)
    reference = _results(tmp_path / "reference")

    args = ["--manifest", str(manifest), "-o", "out", "--model", str(model_dir), "--precision", "fp32",
            "--workers", "1", "--batch-size", "4"]
    proc = subprocess.Popen(_cli(*args), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_bytes().count(b"\n") >= 30) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = results.read_bytes().count(b"\n")
    assert 30 <= first < 320

    rerun = _run(*args, cwd=tmp_path)
    assert rerun.returncode == 2, rerun.stderr
    assert "10 row(s) failed" in rerun.stderr and f"{first} skipped as already done" in rerun.stdout
    got = _results(tmp_path / "out")
    assert [(r["id"], r["text_index"]) for r in got] == [(r["id"], r["text_index"]) for r in reference]
    assert got == reference  # same masks, scores and order as the run that was never interrupted
    errors = _errors(tmp_path / "out")
    assert [e["line"] for e in errors] == bad_lines and _errors(tmp_path / "reference") == errors


def test_torn_last_line_is_dropped_on_resume(tmp_path, fp32):
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS, "id": f"img-{i}"} for i in range(6)]
    for i in range(6):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    predict_manifest(fp32, rows, tmp_path / "ref", workers=0, show_progress=False)
    reference = (tmp_path / "ref" / "results.jsonl").read_text()

    out = tmp_path / "out"
    out.mkdir()
    lines = reference.splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])  # killed mid-write
    summary = predict_manifest(fp32, rows, out, workers=0, show_progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (7, 5, 0)
    assert (out / "results.jsonl").read_text() == reference


# ----------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, model_dir):
    manifest, bad_lines = _write_dataset(tmp_path, good_rows=25)
    # --workers unset: the default decides, as it does for users
    args = ["--manifest", str(manifest), "--model", str(model_dir), "--precision", "fp32", "--batch-size", "4"]
    single = _run(*args, "-o", "single", cwd=tmp_path)
    assert single.returncode == 2, single.stderr
    ddp = subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={_free_port()}", "-m", "sharedris", "predict", *args, "-o", "ddp",
                          "--device", "cpu"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert ddp.returncode != 0  # rank 0 exits 2: rows failed
    assert "50 pair(s) written, 0 skipped as already done, 10 row(s) failed" in ddp.stdout, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "results.jsonl").read_text() == (tmp_path / "single" / "results.jsonl").read_text()
    assert _errors(tmp_path / "ddp") == _errors(tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["errors.jsonl", "results.jsonl"]


# ------------------------------------------------------------------------------ other inputs
def test_csv_manifest(tmp_path, model_dir, fp32):
    for i in range(3):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "text", "id"])
        writer.writerows([["0.png", "the red box", "a"], ["0.png", "the left one, big", "b"], ["1.png", "x"],
                          ["2.png", "", "d"], ["2.png", "the box", ""], ["2.png", "y", "e", "extra"], ["2.png"]])
    result = _run("--manifest", "pairs.csv", "-o", "out", "--model", str(model_dir), "--precision", "fp32",
                  "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2
    got = _results(tmp_path / "out")
    assert [(r["id"], r["text_index"], r["text"]) for r in got] == [
        ("a", 0, "the red box"), ("b", 0, "the left one, big"), (4, 0, "x"), (6, 0, "the box")]  # no id: the line
    assert [(e["line"], e["reason"].split(";")[0]) for e in _errors(tmp_path / "out")] == [
        (5, "expression 1 is empty"), (7, "the row has 4 field(s) but the header has 3"),
        (8, "the row has 1 field(s) but the header has 3")]
    same = fp32.predict(tmp_path / "0.png", ["the red box", "the left one, big"])
    assert [r["rle"] for r in got[:2]] == [encode_rle(m) for m in same.masks]
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(ManifestError, match="no 'image' column"):
        read_manifest(tmp_path / "bad.csv")


def test_folder_input_with_pngs(tmp_path, model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.PNG"):
        scene(22, 18, seed=len(name)).save(folder / name)
    (folder / "notes.txt").write_text("skip me")
    result = _run("photos", "-t", "the red box", "-t", "the left one", "-o", "out", "--model", str(model_dir),
                  "--workers", "1", "--save-png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 pair(s) written, 0 skipped as already done, 0 row(s) failed" in result.stdout
    got = _results(tmp_path / "out")
    assert [(r["image"], r["text_index"]) for r in got] == [(f"photos/{n}", k) for n in ("a.jpg", "b.png", "c.PNG")
                                                            for k in (0, 1)]
    assert all((r["height"], r["width"]) == (18, 22) and (tmp_path / r["overlay_png"]).is_file() for r in got)
    assert _errors(tmp_path / "out") == []


def test_glob_input_and_rerun_skips_everything(tmp_path, model_dir):
    for i in range(3):
        scene(20, 16, seed=i).save(tmp_path / f"shot{i}.png")
    scene(20, 16).save(tmp_path / "other.png")
    args = ["shot*.png", "-t", "the red box", "-o", "out", "--model", str(model_dir), "--workers", "0", "--json"]
    first = _run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["written"] == 3
    assert [r["image"] for r in _results(tmp_path / "out")] == ["shot0.png", "shot1.png", "shot2.png"]
    again = _run(*args, cwd=tmp_path)
    assert (json.loads(again.stdout)["written"], json.loads(again.stdout)["skipped"]) == (0, 3)
    nothing = _run("nope*.png", "-t", "x", "--model", str(model_dir), cwd=tmp_path)
    assert nothing.returncode == 2 and "matches no file" in nothing.stderr


def test_python_api(tmp_path, model_dir):
    assert "predict_manifest" in sharedris.__all__
    for i in range(4):
        scene(20, 16, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS[: 1 + i % 2]} for i in range(4)]
    rows.append({"image": str(tmp_path / "missing.png"), "texts": ["x"]})
    model = load_pretrained(model_dir)
    summary = sharedris.predict_manifest(model, rows, tmp_path / "out", batch_size=3, workers=0,
                                         show_progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (6, 0, 1)
    assert summary.results == tmp_path / "out" / "results.jsonl"
    assert [e["line"] for e in _errors(tmp_path / "out")] == [5]
    rows[4]["image"] = str(tmp_path / "0.png")  # fixed: only that row runs again
    summary = sharedris.predict_manifest(model, rows, tmp_path / "out", workers=0, show_progress=False)
    assert (summary.written, summary.skipped, summary.failed) == (1, 6, 0)
    assert _errors(tmp_path / "out") == []
    with pytest.raises(ValueError, match="batch size"):
        sharedris.predict_manifest(model, rows, tmp_path / "out", batch_size=0)


@pytest.mark.parametrize("cores, threads, device, expected", [
    (2, 2, "cpu", 0),  # every core runs a torch thread: decode in the main process
    (4, 2, "cpu", 2),
    (3, 2, "cpu", 1),
    (16, 8, "cpu", 2),  # at most 2
    (2, 2, "cuda", 1),  # the GPU runs the model: every core but the main one may decode
    (1, 1, "cuda", 0),
])
def test_default_workers_use_only_cores_the_model_leaves_free(monkeypatch, cores, threads, device, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert default_workers(torch.device(device)) == expected


@pytest.mark.parametrize("threads, device, runtime, expected", [
    (2, "cpu", "torch", 2), (16, "cpu", "torch", 2), (1, "cpu", "torch", 1), (8, "cuda", "torch", 1),
    (2, "cpu", "openvino", 1),  # OpenVINO schedules its own threads
])
def test_default_lanes(monkeypatch, threads, device, runtime, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert default_lanes(torch.device(device), runtime) == expected


def test_lanes_write_the_same_lines_in_the_same_order_and_give_back_the_threads(tmp_path, fp32, monkeypatch):
    for i in range(9):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS[: 1 + i % 2], "id": f"img-{i}"} for i in range(9)]
    rows.insert(4, {"image": str(tmp_path / "missing.png"), "texts": ["x"], "id": "gone"})
    threads = torch.get_num_threads()
    one = predict_manifest(fp32, rows, tmp_path / "one", batch_size=2, workers=0, lanes=1, show_progress=False)
    three = predict_manifest(fp32, rows, tmp_path / "three", batch_size=2, workers=0, lanes=3, show_progress=False)
    assert torch.get_num_threads() == threads
    assert (one.written, one.failed) == (three.written, three.failed) == (13, 1)
    a, b = _results(tmp_path / "one"), _results(tmp_path / "three")
    assert [(r["id"], r["text_index"], r["rle"]) for r in a] == [(r["id"], r["text_index"], r["rle"]) for r in b]
    assert [r["score"] for r in a] == pytest.approx([r["score"] for r in b], abs=2e-4)
    assert _errors(tmp_path / "one") == _errors(tmp_path / "three")

    calls = []
    forward = fp32.forward

    def fail_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory in a lane")
        return forward(*args)

    monkeypatch.setattr(fp32, "forward", fail_on_third)
    with pytest.raises(RuntimeError, match="out of memory in a lane"):
        predict_manifest(fp32, rows, tmp_path / "failed", batch_size=2, workers=0, lanes=2, show_progress=False)
    assert torch.get_num_threads() == threads
    written = _results(tmp_path / "failed")
    assert [(r["id"], r["text_index"]) for r in written] == [(r["id"], r["text_index"]) for r in a[:len(written)]]
    with pytest.raises(ValueError, match="lanes must be 1 or more"):
        predict_manifest(fp32, rows, tmp_path / "x", lanes=0)


def test_a_predictor_under_torchrun_joins_the_process_group_whatever_the_workers(tmp_path, model_dir, monkeypatch):
    import sharedris.bulk as bulk

    joined = []
    monkeypatch.setattr(bulk, "_world_size", lambda: 2)  # as under torchrun, before any process group
    monkeypatch.setattr(bulk, "init_distributed", lambda kind: joined.append(kind))
    scene(20, 14, seed=0).save(tmp_path / "0.png")
    predictor = Predictor(load_pretrained(model_dir))
    for workers in (None, 0):
        predict_manifest(predictor, [{"image": str(tmp_path / "0.png"), "texts": ["x"]}], tmp_path / str(workers),
                         workers=workers, show_progress=False)
    assert joined == ["cpu", "cpu"]


def test_no_match_pairs_are_marked_and_get_no_mask_png(tmp_path):
    model = load_pretrained(save_tiny_model(tmp_path / "nomatch", presence_bias=-20.0))
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS, "id": f"img-{i}"} for i in range(2)]
    for i in range(2):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    predict_manifest(model, rows, tmp_path / "out", workers=0, save_png=True, show_progress=False)
    got = _results(tmp_path / "out")
    assert len(got) == 4
    for r in got:
        assert (r["matched"], r["score"], r["mask_png"]) == (False, 0.0, None) and 0 <= r["present"] < 0.01
        assert r["rle"] == encode_rle(np.zeros((14, 20), dtype=bool))
        assert (tmp_path / "out" / Path(r["overlay_png"]).name).is_file()
    assert not list((tmp_path / "out").glob("*_mask.png"))

    predict_manifest(model, rows, tmp_path / "all", presence_threshold=0.0, workers=0, save_png=True,
                     show_progress=False)
    got = _results(tmp_path / "all")
    assert all(r["matched"] is True and Path(r["mask_png"]).is_file() for r in got)


def test_present_pairs_with_an_empty_mask_are_no_match_scored_0(tmp_path, empty_mask_model_dir):
    scene(20, 14).save(tmp_path / "0.png")
    rows = [{"image": str(tmp_path / "0.png"), "texts": TEXTS, "id": "img-0"}]
    predict_manifest(load_pretrained(empty_mask_model_dir), rows, tmp_path / "out", workers=0, save_png=True,
                     show_progress=False)
    got = _results(tmp_path / "out")
    assert [(r["matched"], r["score"], r["mask_png"]) for r in got] == [(False, 0.0, None)] * len(TEXTS)
    assert all(r["present"] > 0.99 and r["rle"] == encode_rle(np.zeros((14, 20), dtype=bool)) for r in got)
    assert not list((tmp_path / "out").glob("*_mask.png"))


def test_bulk_names_the_words_the_model_does_not_know(tmp_path):
    model = save_tiny_model(tmp_path / "known", vocabulary=["the", "red", "box"], description="shape scenes")
    for i in range(2):
        scene(24, 16, seed=i).save(tmp_path / f"{i}.png")
    rows = ['{"image": "0.png", "texts": ["the red box", "the cat"]}', '{"image": "1.png", "texts": ["a red dog"]}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    result = _run("--manifest", "pairs.jsonl", "-o", "out", "--model", str(model), "--precision", "fp32",
                  "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["unknown_words"] for r in _results(tmp_path / "out")] == [[], ["cat"], ["a", "dog"]]
    warnings = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert warnings == ["the model known was trained on shape scenes and does not know: cat, a, dog"]
    summary = predict_manifest(Predictor(load_pretrained(model)), tmp_path / "pairs.jsonl", tmp_path / "again",
                               workers=0, show_progress=False)
    assert summary.unknown_words == ("cat", "a", "dog") and summary.written == 3
