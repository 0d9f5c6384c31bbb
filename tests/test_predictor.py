"""Predictor: the presence threshold, "no match" exactly when the mask is empty (score 0), probabilities
on request, unknown words, a model built in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_model import TINY_MODEL, scene, tiny_model

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
    if precision == "fp32":  # a model in training mode is run in eval mode all the same
        reference = Predictor(load_pretrained(model_dir).eval(), precision="fp32").predict(scene(48, 40, seed=2), TEXTS)
        np.testing.assert_allclose(out.present, reference.present, atol=1e-4)
