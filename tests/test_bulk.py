"""Bulk prediction (`sharedris predict --manifest`, folders, globs, `predict_manifest`): every good pair
once in manifest order, bad rows in errors.jsonl, resume after a kill, reruns that reuse exactly the
pairs whose image bytes, expression, model and settings are unchanged and end as a fresh run would,
the same output under torchrun, "no match" pairs marked and without mask files."""

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
from sharedris.bulk import (BadRow, ManifestError, ResultsMismatch, Row, default_lanes, default_workers,
                            predict_manifest, read_manifest)
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


def _replaced(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "replaced.jsonl").read_text().splitlines()]


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
    assert (summary.written, summary.reused, summary.failed) == (320, 0, 10)
    reference = _results(tmp_path / "reference")

    args = ["--manifest", str(manifest), "-o", "out", "--model", str(model_dir), "--precision", "fp32",
            "--workers", "1", "--batch-size", "4"]
    # Image 100 is a named pipe that nothing writes to: its reader blocks, so the run cannot get past
    # it, and is killed midway whatever the machine's speed.
    blocker = tmp_path / "img" / "100.png"
    picture = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    proc = subprocess.Popen(_cli(*args), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    results = tmp_path / "out" / "results.jsonl"
    deadline = time.monotonic() + 120
    while not (results.exists() and results.read_bytes().count(b"\n") >= 30) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its decoding worker, blocked on the pipe
    proc.wait()
    first = results.read_bytes().count(b"\n")
    assert 30 <= first < 200  # rows 0-99 at most: 200 pairs
    blocker.unlink()
    blocker.write_bytes(picture)

    rerun = _run(*args, cwd=tmp_path)
    assert rerun.returncode == 2, rerun.stderr
    assert "10 row(s) failed" in rerun.stderr
    assert f"{320 - first} new pair(s) written, {first} reused, 0 recomputed, 10 row(s) failed" in rerun.stdout
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
    (out / "run.json").write_bytes((tmp_path / "ref" / "run.json").read_bytes())  # the same model and settings
    summary = predict_manifest(fp32, rows, out, workers=0, show_progress=False)
    assert (summary.written, summary.reused, summary.failed) == (7, 5, 0)
    assert (out / "results.jsonl").read_text() == reference


# ----------------------------------------------------------------------------------- reruns
class _Bar:
    """Stands in for the progress bar: what a run counted."""

    def __init__(self, total, **options):
        self.total, self.n, self.postfix = total, 0, {}

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values

    def close(self):
        pass


@pytest.fixture
def bars(monkeypatch):
    """The progress bars that bulk runs open, in order."""
    import sharedris.bulk.engine as engine

    made = []
    monkeypatch.setattr(engine, "progress", lambda **options: made.append(_Bar(**options)) or made[-1])
    return made


@pytest.fixture
def forwarded(fp32, monkeypatch):
    """How many pairs went through the model, and how many images were decoded."""
    counts = {"pairs": 0, "images": 0}
    forward, preprocess = fp32.forward, fp32.preprocess_image

    def counting_forward(images, ids, pad):
        counts["pairs"] += len(ids)
        return forward(images, ids, pad)

    def counting_preprocess(image):
        counts["images"] += 1
        return preprocess(image)

    monkeypatch.setattr(fp32, "forward", counting_forward)
    monkeypatch.setattr(fp32, "preprocess_image", counting_preprocess)
    return counts


def _rerun(predictor, rows, out, forwarded=None, **options):
    """A run into ``out``: its summary counts and the pairs the model saw in it (with ``forwarded``).
    A fresh run of the same rows into a new folder must write the very same lines."""
    before = dict(forwarded or {"pairs": 0})
    summary = predict_manifest(predictor, rows, out, workers=0, show_progress=False, **options)
    pairs = None if forwarded is None else forwarded["pairs"] - before["pairs"]
    fresh = out.with_name(f"{out.name}-fresh{len(list(out.parent.glob(out.name + '-fresh*')))}")
    predict_manifest(predictor, rows, fresh, workers=0, show_progress=False, **options)
    assert _results(out) == _results(fresh)
    assert (out / "run.json").read_text() == (fresh / "run.json").read_text()
    return (summary.written, summary.reused, summary.recomputed, summary.failed), pairs


def test_reruns_reuse_exactly_the_pairs_still_answered(tmp_path, fp32, forwarded, bars):
    for i in range(5):
        scene(20 + i, 14, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS[: 1 + i % 2], "id": f"img-{i}"} for i in range(5)]
    out = tmp_path / "out"
    assert _rerun(fp32, rows, out, forwarded) == ((7, 0, 0, 0), 7)
    first = out / "results.jsonl"
    inode = first.stat().st_ino

    # (a) the same manifest: everything reused, no image decoded, no pair through the model, the file left alone
    decoded = forwarded["images"]
    summary = predict_manifest(fp32, rows, out, workers=0, show_progress=False)
    assert (summary.written, summary.reused, summary.recomputed, forwarded["images"]) == (0, 7, 0, decoded)
    assert first.stat().st_ino == inode and not (out / "replaced.jsonl").exists()
    assert (bars[-1].total, bars[-1].n, bars[-1].postfix) == (7, 7, {"new": 0, "reused": 7, "recomputed": 0})

    # (b) one more phrase on every row: only the new pairs run
    rows = [{**r, "texts": r["texts"] + ["the blue one"]} for r in rows]
    assert _rerun(fp32, rows, out, forwarded) == ((5, 7, 0, 0), 5)
    assert (bars[-2].total, bars[-2].n, bars[-2].postfix) == (12, 12, {"new": 5, "reused": 7, "recomputed": 0})

    # (c) another picture at the same path, and another expression in a row: only those pairs run again
    scene(22, 14, seed=99).save(tmp_path / "2.png")
    rows[4]["texts"][1] = "the small one"
    old = _results(out)
    assert _rerun(fp32, rows, out, forwarded) == ((0, 9, 3, 0), 3)
    assert _replaced(out) == [r for r in old if r["id"] == "img-2" or (r["id"], r["text_index"]) == ("img-4", 1)]
    hashes = [{r["image_sha256"] for r in lines if r["id"] == "img-2"} for lines in (old, _results(out))]
    assert len(hashes[0]) == len(hashes[1]) == 1 and hashes[0] != hashes[1]

    # rows in another order and with other ids, one row gone: reused under their new ids and places
    old = _results(out)
    moved = [{**r, "id": f"again-{n}"} for n, r in enumerate(reversed(rows[1:]))]
    assert _rerun(fp32, moved, out, forwarded) == ((0, 10, 0, 0), 0)
    assert [(r["id"], r["text"]) for r in _results(out)][:2] == [("again-0", "the red box"),
                                                                   ("again-0", "the small one")]
    assert _replaced(out)[3:] == [r for r in old if r["id"] == "img-0"]


def test_a_failed_image_is_not_counted_by_the_bar_and_a_fixed_one_runs(tmp_path, fp32, bars):
    for i in range(3):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS} for i in range(3)]
    (tmp_path / "1.png").write_text("not an image\n")
    assert _rerun(fp32, rows, tmp_path / "out")[0] == (4, 0, 0, 1)
    assert (bars[0].total, bars[0].n) == (4, 4)  # 6 pairs, 2 of them of an image that cannot be read
    scene(20, 14, seed=1).save(tmp_path / "1.png")
    assert _rerun(fp32, rows, tmp_path / "out")[0] == (2, 4, 0, 0)


def test_rerun_with_pngs_reuses_a_pair_only_when_its_files_are_there(tmp_path, fp32):
    for i in range(2):
        scene(20, 14, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image": str(tmp_path / f"{i}.png"), "texts": TEXTS, "id": f"img-{i}"} for i in range(2)]
    out = tmp_path / "out"
    predict_manifest(fp32, rows, out, workers=0, save_png=True, show_progress=False)
    first = _results(out)
    Path(first[1]["overlay_png"]).unlink()
    summary = predict_manifest(fp32, rows, out, workers=0, save_png=True, show_progress=False)
    assert (summary.written, summary.reused, summary.recomputed) == (0, 3, 1)
    assert _results(out) == first and Path(first[1]["overlay_png"]).is_file()
    # without --save-png the lines are those of a run without it, from the same predictions
    summary = predict_manifest(fp32, rows, out, workers=0, show_progress=False)
    assert summary.reused == 4
    assert _results(out) == [{k: v for k, v in r.items() if not k.endswith("_png")} for r in first]


def test_a_folder_without_run_json_is_recomputed_and_its_lines_kept(tmp_path, fp32):
    scene(20, 14).save(tmp_path / "0.png")
    rows = [{"image": str(tmp_path / "0.png"), "texts": TEXTS}]
    predict_manifest(fp32, rows, tmp_path / "out", workers=0, show_progress=False)
    old = [{k: v for k, v in r.items() if k != "image_sha256"} for r in _results(tmp_path / "out")]
    (tmp_path / "out" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))  # as written before
    (tmp_path / "out" / "run.json").unlink()
    assert _rerun(fp32, rows, tmp_path / "out")[0] == (2, 0, 0, 0)  # new to the folder's run.json
    assert _replaced(tmp_path / "out") == old


def test_another_model_or_precision_is_refused_in_one_sentence_until_fresh(tmp_path, model_dir, fp32):
    scene(20, 14).save(tmp_path / "0.png")
    rows = [{"image": str(tmp_path / "0.png"), "texts": TEXTS}]
    out = tmp_path / "out"
    predict_manifest(fp32, rows, out, workers=0, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bf16 = Predictor(load_pretrained(model_dir), precision="bf16")
    with pytest.raises(ResultsMismatch) as refused:
        predict_manifest(bf16, rows, out, workers=0, show_progress=False)
    assert str(refused.value) == (f"{out} holds results made with precision fp32 (this run: bf16); pass fresh=True "
                                  "to discard them and start afresh, or write to another folder")
    other = load_pretrained(save_tiny_model(tmp_path / "other", seed=1))
    with pytest.raises(ResultsMismatch, match=r"with another model \(sha256 [0-9a-f]{12}\.\.\., this run: "):
        predict_manifest(other, rows, out, precision="fp32", workers=0, show_progress=False)
    with pytest.raises(ResultsMismatch, match=r"with presence threshold 0.5 \(this run: 0.7\); pass"):
        predict_manifest(load_pretrained(model_dir), rows, out, precision="fp32", presence_threshold=0.7, workers=0,
                         show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    assert _rerun(bf16, rows, out, fresh=True)[0] == (2, 0, 0, 0)
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"


def test_cli_rerun_with_another_phrase_runs_it_and_another_precision_needs_fresh(tmp_path, model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        scene(22, 18, seed=i).save(folder / f"{i}.png")
    args = ["photos", "-o", "out", "--model", str(model_dir), "--workers", "0", "--precision", "fp32"]
    assert _run(*args, "-t", "the red box", "-t", "the left one", cwd=tmp_path).returncode == 0
    again = _run(*args, "-t", "the yellow star", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 new pair(s) written, 0 reused, 3 recomputed, 0 row(s) failed" in again.stdout
    assert [r["text"] for r in _results(tmp_path / "out")] == ["the yellow star"] * 3
    assert len((tmp_path / "out" / "replaced.jsonl").read_text().splitlines()) == 6

    refused = _run(*args[:-1], "bf16", "-t", "the yellow star", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines()[-1] == (
        "sharedris predict: error: out holds results made with precision fp32 (this run: bf16); pass --fresh to "
        "discard them and start afresh, or write to another folder")
    fresh = _run(*args[:-1], "bf16", "-t", "the yellow star", "--fresh", "--json", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    summary = json.loads(fresh.stdout)
    assert (summary["written"], summary["reused"], summary["recomputed"], summary["failed"]) == (3, 0, 0, 0)
    assert not (tmp_path / "out" / "replaced.jsonl").exists()


@pytest.mark.slow
def test_an_openvino_run_is_identified_by_the_model_it_converts(tmp_path, model_dir):
    pytest.importorskip("openvino")
    scene(20, 14).save(tmp_path / "0.png")
    rows = [{"image": str(tmp_path / "0.png"), "texts": TEXTS}]
    model = load_pretrained(model_dir)
    summary = predict_manifest(model, rows, tmp_path / "out", runtime="openvino", workers=0, show_progress=False)
    # an OpenVINO predictor passed whole is identified as the model it was converted from
    again = predict_manifest(Predictor(model, runtime="openvino"), rows, tmp_path / "out", workers=0,
                             show_progress=False)
    assert (summary.written, again.reused) == (2, 2)
    with pytest.raises(ResultsMismatch, match="runtime openvino .this run: torch."):
        predict_manifest(model, rows, tmp_path / "out", runtime="torch", workers=0, show_progress=False)
    with torch.no_grad():
        model.decoder.presence_mlp[-1].bias.add_(1.0)
    with pytest.raises(ResultsMismatch, match="model"):  # other weights: another model
        predict_manifest(model, rows, tmp_path / "out", runtime="openvino", workers=0, show_progress=False)


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
    assert "50 new pair(s) written, 0 reused, 0 recomputed, 10 row(s) failed" in ddp.stdout, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "results.jsonl").read_text() == (tmp_path / "single" / "results.jsonl").read_text()
    assert _errors(tmp_path / "ddp") == _errors(tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["errors.jsonl", "results.jsonl", "run.json"]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={_free_port()}", "-m", "sharedris", "predict", *args, "--device", "cpu"],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_rerun_reuses_like_one_process_and_refuses_other_settings(tmp_path, model_dir, fp32):
    manifest, _ = _write_dataset(tmp_path, good_rows=10)
    args = ["--manifest", str(manifest), "--model", str(model_dir), "--batch-size", "4", "-o", "ddp"]
    assert "20 new pair(s) written" in _torchrun(*args, "--precision", "fp32", cwd=tmp_path).stdout
    lines = manifest.read_text().splitlines()
    lines[0] = json.dumps({"image": "img/0.png", "texts": TEXTS + ["the blue one"]})  # one more phrase
    manifest.write_text("\n".join(lines) + "\n")
    scene(30, 20, seed=99).save(tmp_path / "img" / "3.png")  # another picture at the same path
    rerun = _torchrun(*args, "--precision", "fp32", cwd=tmp_path)
    assert "1 new pair(s) written, 18 reused, 2 recomputed, 10 row(s) failed" in rerun.stdout, rerun.stderr[-3000:]
    predict_manifest(fp32, manifest, tmp_path / "fresh", workers=0, show_progress=False)
    assert (tmp_path / "ddp" / "results.jsonl").read_text() == (tmp_path / "fresh" / "results.jsonl").read_text()
    assert len(_replaced(tmp_path / "ddp")) == 2 and not list((tmp_path / "ddp").glob("results.rank*"))

    refused = _torchrun(*args, "--precision", "bf16", cwd=tmp_path)  # every rank stops, none waits forever
    assert refused.returncode != 0
    assert refused.stderr.count("ddp holds results made with precision fp32 (this run: bf16); pass --fresh") == 2
    assert (tmp_path / "ddp" / "results.jsonl").read_text() == (tmp_path / "fresh" / "results.jsonl").read_text()


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
    assert "6 new pair(s) written, 0 reused, 0 recomputed, 0 row(s) failed" in result.stdout
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
    assert (json.loads(again.stdout)["written"], json.loads(again.stdout)["reused"]) == (0, 3)
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
    assert (summary.written, summary.reused, summary.failed) == (6, 0, 1)
    assert summary.results == tmp_path / "out" / "results.jsonl"
    assert [e["line"] for e in _errors(tmp_path / "out")] == [5]
    rows[4]["image"] = str(tmp_path / "0.png")  # fixed: only that row runs again
    summary = sharedris.predict_manifest(model, rows, tmp_path / "out", workers=0, show_progress=False)
    assert (summary.written, summary.reused, summary.failed) == (1, 6, 0)
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


@pytest.mark.parametrize("threads, device, expected", [(2, "cpu", 2), (16, "cpu", 2), (1, "cpu", 1), (8, "cuda", 1)])
def test_default_lanes(monkeypatch, threads, device, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert default_lanes(torch.device(device)) == expected


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
