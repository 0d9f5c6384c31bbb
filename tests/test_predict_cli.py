"""`sharedris predict` on good and bad user input (the Python API's: tests/test_predictor.py).

Bad input is one line on stderr and exit code 2, never a traceback. Expression rules, shared with
the service: an empty (or blank) expression is an error; a long one is cut to the model's token
length (the service instead refuses more than ``--max-text-chars``). An expression that matches
nothing prints "no match" and gets an overlay but no mask file; words the model does not know are
named in one line on stderr.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny_model import save_tiny_model, scene
from PIL import Image
from pycocotools import mask as mask_utils

from sharedris.render import overlay


def _predict(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharedris", "predict", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def matching_model_dir(tmp_path_factory):
    """A tiny model that finds every expression present (presence 1), with an open vocabulary."""
    return save_tiny_model(tmp_path_factory.mktemp("matching") / "matching", presence_bias=20.0)


@pytest.fixture(scope="module")
def no_match_model_dir(tmp_path_factory):
    """A tiny model that finds no expression present (presence 0) and knows only "the", "red", "box"."""
    return save_tiny_model(tmp_path_factory.mktemp("no_match") / "nomatch", presence_bias=-20.0,
                           vocabulary=["the", "red", "box"], description="synthetic shape scenes")


def _assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sharedris predict: error:")
    for needle in needles:
        assert needle in lines[0]


# ------------------------------------------------------------------------------------------ CLI
def test_predict_writes_pngs_at_the_displayed_size_after_exif_rotation(tmp_path, matching_model_dir):
    # stored 40 wide x 24 high; EXIF orientation 6 (rotate 90 degrees clockwise) displays it 24 x 40
    exif = Image.Exif()
    exif[0x0112] = 6
    scene(40, 24, seed=1).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    result = _predict("photo.jpg", "-t", "the red box", "-t", "the left one", "-o", "out", "--model",
                      str(matching_model_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["width"], report["height"]) == (24, 40)
    assert [r["text"] for r in report["results"]] == ["the red box", "the left one"]
    for r in report["results"]:
        assert (r["matched"], r["present"], r["unknown_words"]) == (True, 1.0, [])
        assert 0 <= r["score"] <= 1
        mask_png = Image.open(tmp_path / r["mask_png"])
        assert mask_png.size == (24, 40)
        overlay_png = Image.open(tmp_path / r["overlay_png"])
        assert overlay_png.width == 24 and overlay_png.height > 40  # caption bar on top
        rle = {"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")}
        assert r["rle"]["size"] == [40, 24]
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), np.asarray(mask_png) > 127)


def test_predict_prints_one_line_per_expression_naming_every_file_written(tmp_path, matching_model_dir):
    scene(30, 20).save(tmp_path / "a.png")
    texts = ["the purple diamond", "The purple diamond!", "the 🐱 on the left 👈", "左边的红色盒子", "🐱", "word " * 2000]
    result = _predict("a.png", *[a for t in texts for a in ("-t", t)], "--model", str(matching_model_dir),
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "does not know" not in result.stderr  # an open vocabulary: no word is unknown
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(texts)
    written = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    slugs = ["the-purple-diamond", "the-purple-diamond-2", "the-on-the-left", "左边的红色盒子", "expression",
             "word-" * 11 + "word"]
    assert written == sorted(f"a__{s}_{kind}.png" for s in slugs for kind in ("mask", "overlay"))
    for line, slug in zip(lines, slugs):
        assert " (presence 1.00) -> " in line, line
        assert line.endswith(f"predictions/a__{slug}_mask.png, predictions/a__{slug}_overlay.png"), line


def test_no_match_prints_it_writes_only_the_overlay_and_names_unknown_words(tmp_path, no_match_model_dir):
    image = scene(30, 20, seed=4)
    image.save(tmp_path / "a.png")
    args = ["a.png", "-t", "the red box", "-t", "the cat and the dog", "-t", "the cat", "--model",
            str(no_match_model_dir)]
    result = _predict(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no match  'the red box' (presence 0.00) -> predictions/a__the-red-box_overlay.png",
        "no match  'the cat and the dog' (presence 0.00) -> predictions/a__the-cat-and-the-dog_overlay.png",
        "no match  'the cat' (presence 0.00) -> predictions/a__the-cat_overlay.png"]
    unknown = [line for line in result.stderr.splitlines() if "does not know" in line]
    assert unknown == ["the model nomatch was trained on synthetic shape scenes and does not know: cat, and, dog"]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == [
        "a__the-cat-and-the-dog_overlay.png", "a__the-cat_overlay.png", "a__the-red-box_overlay.png"]
    shown = np.asarray(Image.open(tmp_path / "predictions" / "a__the-red-box_overlay.png"))
    no_match = np.asarray(overlay(image, np.zeros((20, 30), dtype=bool), "the red box", matched=False))
    np.testing.assert_array_equal(shown[-20:], no_match[-20:])  # the "no match" picture below the caption

    report = json.loads(_predict(*args, "--json", "-o", "json", cwd=tmp_path).stdout)
    for r, unknown_words in zip(report["results"], [[], ["cat", "and", "dog"], ["cat"]]):
        assert (r["matched"], r["mask_png"], r["score"], r["unknown_words"]) == (False, None, 0.0, unknown_words)
        assert 0 <= r["present"] < 0.01
        assert (tmp_path / r["overlay_png"]).is_file()
        rle = {"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")}
        assert not mask_utils.decode(rle).any()


def test_present_with_an_empty_mask_is_no_match_scored_0(tmp_path, empty_mask_model_dir):
    image = scene(30, 20, seed=5)
    image.save(tmp_path / "a.png")
    result = _predict("a.png", "-t", "the red box", "--model", str(empty_mask_model_dir), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (r,) = json.loads(result.stdout)["results"]
    assert (r["matched"], r["mask_png"], r["score"]) == (False, None, 0.0) and r["present"] > 0.99
    assert not mask_utils.decode({"size": r["rle"]["size"], "counts": r["rle"]["counts"].encode("ascii")}).any()
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == ["a__the-red-box_overlay.png"]
    expected = overlay(image, np.zeros((20, 30), dtype=bool), "the red box", present=r["present"], matched=False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / r["overlay_png"])), np.asarray(expected))


def test_presence_threshold_option(tmp_path, no_match_model_dir):
    scene(30, 20).save(tmp_path / "a.png")
    args = ["a.png", "-t", "the red box", "--model", str(no_match_model_dir), "--json"]
    report = json.loads(_predict(*args, "--presence-threshold", "0", cwd=tmp_path).stdout)
    (r,) = report["results"]
    assert r["matched"] and r["present"] < 0.01 and (tmp_path / r["mask_png"]).is_file()
    bad = _predict(*args, "--presence-threshold", "1.5", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--presence-threshold: expected a number from 0 to 1, got '1.5'" in bad.stderr


def _malicious_pickle(marker) -> bytes:
    class Payload:  # unpickling this calls open(marker, "w"), i.e. runs code
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps({"weight": Payload()})


@pytest.mark.parametrize("case", ["corrupt", "zero_byte", "text_file", "bomb", "missing_image", "missing_model",
                                  "pickle_weights", "torch_save_weights", "empty_text", "blank_text"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, case):
    image, texts, model, needles = "img.png", ["the red box"], str(model_dir), []
    marker = tmp_path / "pwned"
    scene(30, 20).save(tmp_path / "img.png")
    if case == "corrupt":
        data = (tmp_path / "img.png").read_bytes()
        (tmp_path / "img.png").write_bytes(data[: len(data) // 2])
        needles = ["img.png", "corrupt or truncated"]
    elif case == "zero_byte":
        (tmp_path / "img.png").write_bytes(b"")
        needles = ["img.png", "empty (0 bytes)"]
    elif case == "text_file":
        image = "notes.txt"
        (tmp_path / image).write_text("not an image\n" * 20)
        needles = ["notes.txt", "not an image file"]
    elif case == "bomb":
        # 100 M pixels (> Pillow's 89 M limit) in a 1-bit PNG of a few kB; Pillow refuses at open
        image = "bomb.png"
        Image.new("1", (10_000, 10_000)).save(tmp_path / image)
        needles = ["bomb.png", "decompression bomb"]
    elif case == "missing_image":
        image, needles = "nope.jpg", ["nope.jpg", "does not exist"]
    elif case == "missing_model":
        model, needles = str(tmp_path / "no_model"), ["no_model", "does not exist"]
    elif case in ("pickle_weights", "torch_save_weights"):
        model = str(tmp_path / "evil")
        save_tiny_model(tmp_path / "evil")
        if case == "pickle_weights":
            (tmp_path / "evil" / "model.safetensors").write_bytes(_malicious_pickle(marker))
        else:
            torch.save({"weight": torch.zeros(1)}, tmp_path / "evil" / "model.safetensors")
        needles = ["model.safetensors", "not a readable safetensors file"]
    elif case == "empty_text":
        texts, needles = [""], ["expression 1 is empty"]
    elif case == "blank_text":
        texts, needles = ["the box", "  "], ["expression 2 is empty"]
    args = [image, *[a for t in texts for a in ("-t", t)], "--model", model]
    _assert_user_error(_predict(*args, cwd=tmp_path), *needles)
    assert not marker.exists()
    assert not (tmp_path / "predictions").exists() or not any((tmp_path / "predictions").iterdir())
