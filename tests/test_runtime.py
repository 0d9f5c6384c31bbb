"""The OpenVINO runtime: the same outputs as PyTorch, dynamic batch and text length, a fixed-shape model for
one pair, clear refusals."""

import json
import sys

import numpy as np
import pytest
import torch
from _tiny_model import encode, save_tiny_model, scene, tiny_model

from sharedris import Predictor, load_pretrained
from sharedris.conversions import ConversionCache
from sharedris.modeling.segmenter import INFERENCE_FIELDS
from sharedris.runtime import OpenVINOModel, RuntimeChoiceError, check_runtime


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ov") / "tiny")


@pytest.fixture(scope="module")
def compiled(model_dir):
    return OpenVINOModel(load_pretrained(model_dir), "fp32", threads=1)


@pytest.mark.parametrize("batch, length", [(1, 24), (3, 24), (2, 9)])  # other batch sizes and text lengths
def test_openvino_gives_torchs_outputs(model_dir, compiled, batch, length):
    model = load_pretrained(model_dir)
    g = torch.Generator().manual_seed(batch * 100 + length)
    image = torch.randn(batch, 3, 64, 64, generator=g)
    ids = torch.randint(4, 100, (batch, length), generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[-1, length // 2:] = True
    with torch.no_grad():
        want = model(image, ids, pad)
    got = compiled(image, ids, pad)
    assert want.anchor_logits is got.anchor_logits is None  # a training-only output
    for name in INFERENCE_FIELDS:
        a, b = getattr(want, name), getattr(got, name)
        assert b.dtype == torch.float32 and b.shape == a.shape, name
        assert torch.allclose(a, b, atol=1e-4), f"{name}: max |diff| {(a - b).abs().max():.2e}"


def test_one_pair_at_the_text_length_runs_the_fixed_shape_model_and_the_rest_a_dynamic_one_built_when_needed(
        model_dir, tmp_path):
    model = load_pretrained(model_dir)
    L = model.config.text_len
    cache = ConversionCache(tmp_path / "cache")
    compiled = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    assert all(p.get_partial_shape().is_static for p in compiled.single.inputs)

    def entries() -> int:
        return len([p for p in cache.root.iterdir() if not p.name.startswith(".")])

    assert entries() == 2  # the converted model and the fixed-shape one compiled
    g = torch.Generator().manual_seed(1)
    for batch, length in ((1, L), (2, L), (1, L - 3), (1, L)):
        image, ids = torch.randn(batch, 3, 64, 64, generator=g), torch.randint(4, 100, (batch, length), generator=g)
        pad = torch.zeros(batch, length, dtype=torch.bool)
        pad[:, length - 4:] = True
        with torch.no_grad():
            want = model(image, ids, pad)
        assert torch.allclose(compiled(image, ids, pad).mask_logits, want.mask_logits, atol=1e-4)
        if batch == 1 and length == L and compiled._dynamic is None:  # one pair: nothing else built yet
            assert entries() == 2 and set(vars(compiled._requests)) == {"single"}
    assert not compiled.dynamic.input("image").get_partial_shape().is_static
    assert entries() == 3 and set(vars(compiled._requests)) == {"single", "dynamic"}
    # a later start reads both compiled models from the cache: it writes nothing
    written = []
    cache.write = lambda key, fill: written.append(key)
    again = OpenVINOModel(model, "fp32", threads=1, cache=cache)
    pair = (image.repeat(2, 1, 1, 1), ids.repeat(2, 1), pad.repeat(2, 1))
    assert again.source == "compiled model from cache"
    assert torch.equal(again(*pair).mask_logits, compiled(*pair).mask_logits) and written == []


def test_openvino_converts_coordinate_features_and_the_gated_anchor_point():
    model = tiny_model(coord_features=True, anchor_point=True, anchor_gated=True).eval()
    with torch.no_grad():  # trained weights: the map and the anchor point's weight are not zero
        model.decoder.coord_proj.weight.normal_()
        model.decoder.bowl_mlp[-1].weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(5)
    image, ids = torch.randn(2, 3, 64, 64, generator=g), torch.randint(4, 100, (2, 24), generator=g)
    pad = torch.zeros(2, 24, dtype=torch.bool)
    with torch.no_grad():
        want = model(image, ids, pad).mask_logits
    got = OpenVINOModel(model, "fp32", threads=1)(image, ids, pad).mask_logits
    assert torch.allclose(want, got, atol=1e-4), f"max |diff| {(want - got).abs().max():.2e}"


def test_openvino_serves_several_threads_at_once(compiled):
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, 3, 64, 64, generator=g), torch.randint(4, 100, (2, 24), generator=g),
                torch.zeros(2, 24, dtype=torch.bool)) for _ in range(6)]
    alone = [compiled(*b).mask_logits for b in batches]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda b: compiled(*b).mask_logits, batches))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_predictor_on_openvino_predicts_as_on_torch(model_dir, tmp_path):
    image = scene(48, 40, seed=3)
    texts = ["the red box", "the thing on the left"]
    torch_pred = Predictor(load_pretrained(model_dir), precision="fp32").predict(image, texts, return_probs=True)
    ov = Predictor(load_pretrained(model_dir), precision="fp32", runtime="openvino")
    assert ov.runtime == "openvino" and ov.precision == "fp32"
    ov_pred = ov.predict(image, texts, return_probs=True)
    assert np.allclose(ov_pred.probs, torch_pred.probs, atol=1e-4)
    assert np.allclose(ov_pred.scores, torch_pred.scores, atol=1e-4)
    assert np.allclose(ov_pred.present, torch_pred.present, atol=1e-4)
    # bf16 runs, close to fp32 (OpenVINO's bf16 keeps fp32 accumulation)
    bf16 = Predictor(load_pretrained(model_dir), precision="bf16", runtime="openvino").predict(image, texts,
                                                                                                  return_probs=True)
    assert np.abs(bf16.probs - torch_pred.probs).max() < 0.05


@pytest.mark.parametrize("runtime, precision, device, message", [
    ("openvino", "int8", "cpu", "runtime openvino runs fp32 or bf16, not int8"),
    ("openvino", "bf16", "cuda", "runtime openvino runs on the CPU only"),
    ("onnx", "fp32", "cpu", "unknown runtime 'onnx'; choose one of auto, torch, openvino"),
])
def test_runtimes_that_cannot_run_are_refused_in_one_sentence(runtime, precision, device, message):
    with pytest.raises(RuntimeChoiceError, match=message):
        check_runtime(runtime, precision, torch.device(device))
    check_runtime("torch", precision, torch.device(device))  # torch takes them all


def test_without_openvino_installed_the_error_says_how_to_get_it(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails
    with pytest.raises(ImportError, match=r"pip install openvino"):
        OpenVINOModel(load_pretrained(model_dir), "fp32")


def test_eval_and_predict_say_which_runtime_ran(model_dir, tmp_path):
    import subprocess

    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "sharedris", "eval", "--model", str(model_dir), "--dataset", "synthetic",
                          "--split", "val", "--num-samples", "6", "--runtime", "openvino", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["runtime"] == "openvino"
    assert "runtime openvino," in run.stdout
    scene(40, 30).save(tmp_path / "a.png")
    run = subprocess.run([sys.executable, "-m", "sharedris", "predict", str(tmp_path / "a.png"), "-t", "the box",
                          "--model", str(model_dir), "-o", str(tmp_path / "p"), "--runtime", "openvino",
                          "--precision", "int8"], capture_output=True, text=True)
    assert run.returncode == 2 and "runtime openvino runs fp32 or bf16, not int8" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_service_runs_on_openvino_as_on_torch(model_dir):
    from fastapi.testclient import TestClient

    from sharedris.serve.app import create_app

    image = encode(scene(40, 30, seed=5))
    answers = {}
    for runtime in ("torch", "openvino"):
        with TestClient(create_app(model_dir, precision="fp32", runtime=runtime)) as client:
            assert client.get("/healthz").json()["runtime"] == runtime
            r = client.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                            data={"text": ["the red box", "the left one"]})
            assert r.status_code == 200, r.text
            answers[runtime] = r.json()["results"]
    for a, b in zip(answers["torch"], answers["openvino"]):
        assert a["present"] == pytest.approx(b["present"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-3)
    with pytest.raises(RuntimeChoiceError, match="not int8"):
        create_app(model_dir, precision="int8", runtime="openvino")
