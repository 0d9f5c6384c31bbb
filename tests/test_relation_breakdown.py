"""Tests for benchmarks/relation_breakdown.py: which scenes it scores and how it sorts expressions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from _tiny_model import save_tiny_model

from sharedris.data.config import DataConfig
from sharedris.data.registry import build_source

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "relation_breakdown.py"
DATA = dict(synthetic_world="varied", synthetic_train_size=40, synthetic_image_size=64, synthetic_fresh_epochs=True,
            synthetic_train_families=("relation", "colour_shape"), synthetic_relation_candidates=(4, 4))


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("relation_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe(tmp_path: Path) -> Path:
    lines = ["epochs: 3", "data:"] + [f"  {k}: {list(v) if isinstance(v, tuple) else str(v).lower()}"
                                      for k, v in DATA.items()]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_recipe_s_relation_scenes_are_those_its_last_epoch_trained_on(tmp_path: Path) -> None:
    got = list(_script().relation_scenes(6, 64, recipe=str(_recipe(tmp_path))))
    trained = build_source(DataConfig(**DATA), "train", train=True)
    trained.set_epoch(2)
    expected = [s for s in (trained[i] for i in range(len(trained))) if s["family"] == "relation"][:6]
    assert len(got) == 6 and all(s["family"] == "relation" for s in got)
    assert [(s["index"], s["text"]) for s in got] == [(s["index"], s["text"]) for s in expected]
    trained.set_epoch(0)
    first = [s["text"] for s in (trained[i] for i in range(len(trained))) if s["family"] == "relation"][:6]
    assert first != [s["text"] for s in got]
    (tmp_path / "none.yaml").write_text("data:\n  synthetic_train_families: [size]\n")
    with pytest.raises(SystemExit, match="no relation scenes"):
        next(_script().relation_scenes(2, 64, recipe=str(tmp_path / "none.yaml")))


def test_every_far_phrasing_is_counted_as_far(tmp_path: Path, monkeypatch, capsys) -> None:
    model = save_tiny_model(tmp_path / "full", presence_bias=20.0, mask_bias=50.0)  # every mask the whole image
    module = _script()
    scenes = list(module.relation_scenes(60, 64, world="varied"))
    far = sum(any(w in s["text"] for w in ("farthest", "furthest", "far from")) for s in scenes)
    assert 0 < far < 60 and any("furthest" in s["text"] for s in scenes)
    monkeypatch.setattr(sys, "argv", ["relation_breakdown.py", str(model), "--scenes", "60", "--world", "varied"])
    module.main()
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("far,", "near,"))]
    assert sum(int(r[3]) for r in rows if r[0] == "far,") == far
    assert sum(int(r[3]) for r in rows) == 60
    # a whole-image mask: a small IoU, and its pixels on the target, the other candidates and the anchor
    assert all(0 < float(r[4]) < 0.5 and float(r[5]) > 0 and float(r[6]) > 0 and float(r[7]) > 0 for r in rows)


@pytest.mark.parametrize("gated", [False, True])
def test_the_logit_terms_are_the_decoder_s_own(gated) -> None:
    import torch
    from _tiny_model import tiny_model

    from sharedris.data.synthetic import SyntheticRefScenes
    from sharedris.modeling.decoder import _within_mask, coordinate_channels, squared_distance_from_centre
    from sharedris.modeling.pretrained import resolve_tokenizer
    from sharedris.text import Tokenizer

    model = tiny_model(coord_features=True, anchor_point=True, anchor_gated=gated).eval()
    decoder = model.decoder
    with torch.no_grad():  # trained weights: neither term is zero
        decoder.coord_proj.weight.normal_()
        decoder.bowl_mlp[-1].bias.fill_(0.3)
    tokenizer = Tokenizer(resolve_tokenizer(model.config, None), max_len=model.config.text_len)
    sample = SyntheticRefScenes("val", size=64, length=1, families=("relation",), world="varied")[0]
    seen = {}
    decoder.mask_mlp.register_forward_hook(lambda mod, args, out: seen.update(m=out[0]))
    decoder.bowl_mlp.register_forward_hook(lambda mod, args, out: seen.update(a=out[0, 0]))
    decoder.register_forward_hook(lambda mod, args, out: seen.update(total=out[0][0, 0], anchor=out[3]))
    with torch.no_grad():
        terms = _script().logit_terms(model, tokenizer, sample)
        model(*_inputs_of(model, tokenizer, sample))  # once more, for the hooks above
        # the two terms written out from the decoder's parts
        coords = (decoder.coord_proj(coordinate_channels(*seen["total"].shape, torch.device("cpu"), torch.float32))
                  @ seen["m"]) * decoder.logit_scale
        d2 = squared_distance_from_centre(seen["anchor"][:, 0])
    if gated:  # the gate reads the logits before the term: the features' and the coordinates' sum
        d2 = _within_mask(d2, (terms["features"] + terms["coordinates"] + decoder.logit_bias)[None])
    assert torch.allclose(terms["coordinates"], coords, atol=1e-4)
    assert torch.allclose(terms["anchor"], 16 * seen["a"] * d2[0], atol=1e-4) and terms["anchor"].abs().max() > 0.05
    assert torch.allclose(terms["features"] + terms["coordinates"] + terms["anchor"] + decoder.logit_bias,
                          seen["total"], atol=1e-5)
    plain = tiny_model().eval()
    with torch.no_grad():
        terms = _script().logit_terms(plain, tokenizer, sample)
    assert terms["coordinates"] is None and terms["anchor"] is None
    assert torch.allclose(terms["features"] + plain.decoder.logit_bias, terms["total"])


def _inputs_of(model, tokenizer, sample):
    from sharedris.data.transforms import image_to_tensor

    cfg = model.config
    ids, pad = tokenizer([sample["text"]])
    return image_to_tensor(sample["image"], cfg.image_size, cfg.mean, cfg.std)[None], ids, pad
