"""One record per answer: the CLI's --json, a bulk run's results.jsonl and the service give the same
fields with the same values for the same image, and name their PNGs the same way."""

from __future__ import annotations

import json

import numpy as np
from _tiny_model import encode, save_tiny_model, scene
from fastapi.testclient import TestClient
from pycocotools import mask as mask_utils

from sharedris.bulk import predict_manifest
from sharedris.cli import main
from sharedris.modeling.pretrained import load_pretrained
from sharedris.render import mask_bbox, png_names
from sharedris.serve.app import create_app

TEXTS = ["the red box", "the Red box!", "the thing on the left"]
RECORD = ["text", "matched", "present", "score", "rle", "bbox", "unknown_words"]


def test_the_box_is_cocos_x_y_width_height_of_the_mask_pixels():
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2] = True
    mask[3, 6] = True
    assert mask_bbox(mask) == [2, 1, 5, 3]
    assert mask_bbox(np.zeros((6, 9), bool)) is None
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert mask_bbox(mask) == [int(v) for v in mask_utils.toBbox(rle)]  # pycocotools agrees


def test_png_names_are_safe_and_unique_per_image():
    assert png_names("scene", ["the purple diamond", "The purple diamond!", "?"]) == [
        ("scene__the-purple-diamond_mask.png", "scene__the-purple-diamond_overlay.png"),
        ("scene__the-purple-diamond-2_mask.png", "scene__the-purple-diamond-2_overlay.png"),
        ("scene__expression_mask.png", "scene__expression_overlay.png")]
    assert png_names("../a b", ["x"])[0][0] == "..-a-b__x_mask.png"  # no folder in a name


def test_cli_bulk_and_service_give_the_same_records(tmp_path, model_dir, capsys):
    scene(48, 36, seed=4).save(tmp_path / "a.png")
    main(["predict", str(tmp_path / "a.png"), *[a for t in TEXTS for a in ("-t", t)], "--model", str(model_dir),
          "--precision", "fp32", "--json", "-o", str(tmp_path / "one")])
    single = json.loads(capsys.readouterr().out)["results"]

    predict_manifest(load_pretrained(model_dir), [{"image": str(tmp_path / "a.png"), "texts": TEXTS, "id": "a"}],
                     tmp_path / "bulk", precision="fp32", workers=0, save_png=True, show_progress=False)
    bulk = [json.loads(line) for line in (tmp_path / "bulk" / "results.jsonl").read_text().splitlines()]

    with TestClient(create_app(model_dir, precision="fp32")) as client:
        r = client.post("/v1/segment", files={"image": ("a.png", encode(scene(48, 36, seed=4)), "image/png")},
                        data={"text": TEXTS})
    assert r.status_code == 200, r.text
    served = r.json()["results"]

    assert len(single) == len(bulk) == len(served) == len(TEXTS)
    for one, line, answer in zip(single, bulk, served):
        assert list(answer) == RECORD
        assert [k for k in one if k in RECORD] == [k for k in line if k in RECORD] == RECORD
        for key in RECORD:
            assert one[key] == line[key] == answer[key], key
        mask = mask_utils.decode(answer["rle"]).astype(bool)
        assert answer["bbox"] == mask_bbox(mask) and (answer["bbox"] is None) == (not answer["matched"])
        # the same PNG names in both modes (the bulk row's id is the image's name here)
        for key in ("mask_png", "overlay_png"):
            assert (None if one[key] is None else one[key].rsplit("/", 1)[1]) == \
                (None if line[key] is None else line[key].rsplit("/", 1)[1]), key


def test_no_match_has_no_box_and_an_empty_mask(tmp_path):
    folder = save_tiny_model(tmp_path / "nomatch", presence_bias=-20.0)  # nothing present
    with TestClient(create_app(folder, precision="fp32")) as client:
        r = client.post("/v1/segment", files={"image": ("a.png", encode(scene(30, 20)), "image/png")},
                        data={"text": ["the red box"]})
    (answer,) = r.json()["results"]
    assert (answer["matched"], answer["bbox"], answer["score"]) == (False, None, 0.0)
    assert not mask_utils.decode(answer["rle"]).any()
