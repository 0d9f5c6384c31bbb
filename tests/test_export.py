"""ONNX export: onnxruntime gives PyTorch's logits at other batch sizes and text lengths than traced."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx  # the dev extra; a missing install fails rather than skips
import onnxruntime as ort
import pytest
import torch
from _tiny_model import save_tiny_model

from sharedris.export import INPUT_NAMES, OUTPUT_NAMES, export_onnx
from sharedris.modeling.pretrained import load_pretrained
from sharedris.text import Tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    model = load_pretrained(save_tiny_model(folder / "tiny")).train()
    path = export_onnx(model, folder / "model.onnx")
    assert model.training  # the caller's model is left as it was; the graph is the eval-mode model
    return model.eval(), path


def _inputs(model, texts, text_len, seed):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(len(texts), 3, cfg.image_size, cfg.image_size, generator=g)
    ids, pad = Tokenizer(model.tokenizer_file, max_len=text_len)(texts)
    return image, ids, pad


@pytest.mark.parametrize("texts, text_len", [
    (["the red box"], 24),  # batch 1, the model's own text length, with padding
    (["a blue square on the far left", "the small one", "that", "the third green circle from the right"], 9),
])
def test_onnxruntime_matches_pytorch(exported, texts, text_len):
    model, path = exported
    image, ids, pad = _inputs(model, texts, text_len, seed=len(texts))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, dict(zip(INPUT_NAMES, (image.numpy(), ids.numpy(), pad.numpy()))))
    with torch.inference_mode():
        expected = model(image, ids, pad)
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES) == list(expected._fields[:3])
    assert expected.anchor_logits is None  # a training-only output
    logits = outputs[0]
    assert logits.shape == expected.mask_logits.shape == (len(texts), 1, model.config.image_size, model.config.image_size)
    for got, want in zip(outputs, expected[:3], strict=True):  # the mask logits and every head
        assert np.abs(got - want.numpy()).max() <= 1e-3


def test_graph_carries_the_model_config(exported):
    model, path = exported
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["sharedris_config"]) == model.config.to_dict()


def test_cli_export_of_a_missing_model_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sharedris", "export", "onnx", "--model", str(tmp_path / "nope"),
                             "-o", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("sharedris export: error:") and "does not exist" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_large_models_keep_their_weights_beside_the_graph(exported, tmp_path, monkeypatch):
    import sharedris.export

    model, _ = exported
    monkeypatch.setattr(sharedris.export, "_MAX_INLINE_BYTES", 0)  # as if the weights were over 2 GB
    path = export_onnx(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    image, ids, pad = _inputs(model, ["the red box", "that"], 12, seed=3)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, dict(zip(INPUT_NAMES, (image.numpy(), ids.numpy(), pad.numpy()))))[0]
    with torch.inference_mode():
        assert np.abs(logits - model(image, ids, pad).mask_logits.numpy()).max() <= 1e-3
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert "sharedris_config" in meta


@pytest.mark.slow
def test_default_model_exports_within_tolerance(tmp_path):
    """The shipped model: ORT logits within 1e-3 of PyTorch's, batch and length dynamic."""
    model = load_pretrained("default")
    path = export_onnx(model, tmp_path / "default.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for texts, text_len in ((["the yellow diamond"], 24), (["the big star", "the circle on the left", "red"], 11)):
        image, ids, pad = _inputs(model, texts, text_len, seed=len(texts))
        logits = session.run(None, dict(zip(INPUT_NAMES, (image.numpy(), ids.numpy(), pad.numpy()))))[0]
        with torch.inference_mode():
            assert np.abs(logits - model(image, ids, pad).mask_logits.numpy()).max() <= 1e-3
