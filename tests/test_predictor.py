"""Predictor: any image input, the expression rules, the presence threshold, "no match" exactly when
the mask is empty (score 0), probabilities on request, unknown words, a model built in memory, and
the caller's model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_model import TINY_MODEL, scene, tiny_model
from PIL import Image

from sharedris.data.images import ImageError
from sharedris.modeling.registry import build_model
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.predictor import Predictor

TEXTS = ["the red box", "the green one", "the top one"]


def test_probabilities_on_request_agree_with_the_masks(predictor):
    image = scene(90, 60)
    without = predictor.predict(image, TEXTS)
    out = predictor.predict(image, TEXTS, return_probs=True)
    assert without.probs is None
    assert out.probs.shape == out.masks.shape == (3, 60, 90) and out.probs.dtype == np.float32
    assert 0.0 <= out.probs.min() and out.probs.max() <= 1.0
    matched = out.matched[:, None, None]
    np.testing.assert_array_equal(out.masks, (out.probs > 0.5) & matched)
    np.testing.assert_array_equal(out.masks, without.masks)


def test_the_presence_threshold_empties_the_masks_of_no_match(model_dir):
    from sharedris.modeling.pretrained import load_pretrained

    model = load_pretrained(model_dir)
    image = scene(64, 64, seed=1)
    everything = Predictor(model, presence_threshold=0.0).predict(image, TEXTS)
    nothing = Predictor(model, presence_threshold=1.0).predict(image, TEXTS)
    assert everything.matched.all() and everything.masks.any()
    assert not nothing.matched.any() and not nothing.masks.any()
    np.testing.assert_array_equal(everything.present, nothing.present)  # the threshold only decides
    assert ((0 < everything.present) & (everything.present < 1)).all()
    with pytest.raises(ValueError, match="presence_threshold"):
        Predictor(model, presence_threshold=1.5)


NO_HEADS = {"presence_head": False, "iou_head": False}


@pytest.mark.parametrize("heads, presence_bias, mask_bias, matched", [
    ({}, 20.0, -50.0, False),  # sure something is there, but not one mask pixel: no match
    ({}, -20.0, 50.0, False),  # a full mask, but nothing present: no match
    ({}, 20.0, 50.0, True),
    (NO_HEADS, None, -50.0, False),  # without a presence head an empty mask is still no match
    (NO_HEADS, None, 50.0, True),  # the score is then the mean probability inside the mask
])
def test_matched_is_exactly_a_non_empty_mask_and_no_match_scores_0(heads, presence_bias, mask_bias, matched):
    model = tiny_model(presence_bias=presence_bias, mask_bias=mask_bias, **heads)
    out = Predictor(model).predict(scene(30, 20), TEXTS)
    np.testing.assert_array_equal(out.matched, [matched] * len(TEXTS))
    np.testing.assert_array_equal(out.masks.any(axis=(1, 2)), out.matched)
    assert (out.scores > 0.99).all() if matched else (out.scores == 0.0).all()
    assert (out.present < 0.01).all() if presence_bias == -20.0 else (out.present > 0.99).all()


def test_no_match_is_decided_at_the_output_size(predictor):
    logits = torch.full((1, 1, 8, 8), -1.0)
    logits[..., 0, 0] = 1.0  # one pixel, which a 2x2 answer does not sample
    output = SegmenterOutput(logits, torch.tensor([5.0]), torch.tensor([0.9]))
    full, small = predictor.postprocess(output, 8, 8), predictor.postprocess(output, 2, 2)
    assert full.matched[0] and full.masks.sum() == 1 and full.scores[0] == pytest.approx(0.9)
    assert not small.matched[0] and not small.masks.any() and small.scores[0] == 0.0
    assert small.present[0] == full.present[0] > 0.99


def test_unknown_words_are_named_only_with_a_vocabulary(predictor, model_dir):
    from sharedris.modeling.pretrained import load_pretrained

    assert predictor.predict(scene(32, 32), ["the red cat"]).unknown_words == [[]]  # open vocabulary
    model = load_pretrained(model_dir)
    model.vocabulary = frozenset({"the", "red", "box"})
    vocab = Predictor(model)
    assert vocab.predict(scene(32, 32), ["The red cat, the red DOG", "the box"]).unknown_words == [["cat", "dog"], []]


def test_a_model_built_in_memory_predicts_with_its_bundled_tokenizer():
    model = build_model("sharedris_tiny", **TINY_MODEL)
    assert model.tokenizer_file is None
    out = Predictor(model).predict(scene(40, 30), TEXTS[:2])
    assert out.masks.shape == (2, 30, 40) and out.scores.shape == out.present.shape == (2,)


def _state(model: torch.nn.Module) -> tuple:
    """What a predictor must not change in its caller's model: device, training flag, dtypes, weights."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return (tuple(sorted({str(t.device) for t in tensors.values()})), model.training,
            tuple(sorted({str(t.dtype) for t in tensors.values()})),
            {name: t.detach().double().sum().item() for name, t in tensors.items()},
            {name: t.detach().clone() for name, t in tensors.items()})


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("precision, runtime", [("fp32", "torch"), ("bf16", "torch"), ("int8", "torch"),
                                                ("fp32", "openvino"), ("bf16", "openvino")])
def test_a_predictor_leaves_its_callers_model_as_it_was(model_dir, precision, runtime, training):
    from sharedris.modeling.pretrained import load_pretrained

    model = load_pretrained(model_dir).train(training)
    before = _state(model)
    predictor = Predictor(model, precision=precision, runtime=runtime)
    out = predictor.predict(scene(48, 40, seed=2), TEXTS)
    after = _state(model)
    assert after[:4] == before[:4]
    assert all(torch.equal(before[4][name], t) for name, t in after[4].items())
    assert predictor.precision == precision and predictor.runtime == runtime
    if runtime == "torch":  # a model in training mode is run in eval mode all the same
        assert not any(m.training for m in predictor.runner.module.modules())
    if precision == "fp32":
        reference = Predictor(load_pretrained(model_dir).eval(), precision="fp32").predict(scene(48, 40, seed=2), TEXTS)
        np.testing.assert_allclose(out.present, reference.present, atol=1e-4)


def _png_16bit(tmp_path) -> Image.Image:
    arr = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")  # saved as 16-bit greyscale
    img = Image.open(tmp_path / "deep.png")
    assert img.mode.startswith("I")
    return img


@pytest.mark.parametrize("kind", ["path", "str_path", "bytes", "pil", "array_rgb", "array_grey", "array_rgba",
                                  "grey", "rgba", "palette", "16bit", "cmyk"])
def test_predict_accepts_any_image_input(tmp_path, predictor, kind):
    base = scene(30, 20, seed=2)
    base.save(tmp_path / "base.png")
    src = {
        "path": lambda: tmp_path / "base.png",
        "str_path": lambda: str(tmp_path / "base.png"),
        "bytes": lambda: (tmp_path / "base.png").read_bytes(),
        "pil": lambda: base,
        "array_rgb": lambda: np.asarray(base),
        "array_grey": lambda: np.asarray(base.convert("L")),
        "array_rgba": lambda: np.asarray(base.convert("RGBA")),
        "grey": lambda: base.convert("L"),
        "rgba": lambda: base.convert("RGBA"),
        "palette": lambda: base.convert("P"),
        "16bit": lambda: _png_16bit(tmp_path),
        "cmyk": lambda: base.convert("CMYK"),
    }[kind]()
    texts = ["the red box", "the left one"]
    pred = predictor.predict(src, texts)
    assert pred.masks.shape == (2, 20, 30) and pred.masks.dtype == bool
    assert pred.scores.shape == (2,) and np.all((pred.scores >= 0) & (pred.scores <= 1))
    if kind in ("path", "str_path", "bytes", "pil", "array_rgb", "array_rgba"):  # same pixels, same masks
        np.testing.assert_array_equal(pred.masks, predictor.predict(base, texts).masks)


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 2000)])
def test_predict_on_tiny_and_extreme_aspect_images(predictor, size):
    pred = predictor.predict(scene(*size), "the box")
    assert pred.masks.shape == (1, size[1], size[0])


def test_predict_expression_rules(predictor):
    img = scene(16, 16)
    with pytest.raises(ValueError, match="expression 1 is empty"):
        predictor.predict(img, "")
    with pytest.raises(ValueError, match="expression 2 is empty"):
        predictor.predict(img, ["a", " \n"])
    with pytest.raises(ValueError, match="at least one"):
        predictor.predict(img, [])
    # a long expression is cut to the model's token length: same result as its first few words
    long = "the red box " * 1000
    np.testing.assert_array_equal(predictor.predict(img, long).masks, predictor.predict(img, long[:300]).masks)
    assert predictor.predict(img, ["🐱👈", "左边的红色盒子"]).masks.shape == (2, 16, 16)


def test_predict_refuses_bad_arrays(predictor):
    with pytest.raises(ImageError, match="uint8"):
        predictor.predict(np.zeros((4, 4, 3), dtype=np.float32), "a")
    with pytest.raises(ImageError, match="shape"):
        predictor.predict(np.zeros((4, 4, 2), dtype=np.uint8), "a")
