"""evaluate: its "no target" answers are the predictor's "no match" (presence below the threshold, or a
mask without a pixel), the same decision as predict, bulk and the service give."""

from __future__ import annotations

import pytest
import torch
from _tiny_model import tiny_model

from sharedris.data.synthetic import SyntheticRefScenes
from sharedris.data.synthetic.dataset import GENERAL_FAMILIES
from sharedris.evaluate import PROTOCOLS, evaluate


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_present_expression_with_an_empty_mask_is_scored_as_no_match(protocol):
    model = tiny_model(presence_bias=20.0, mask_bias=-50.0)  # sure of every expression, never a pixel
    source = SyntheticRefScenes("val", size=64, length=2 * len(GENERAL_FAMILIES), families=GENERAL_FAMILIES,
                                balanced=True)
    metrics = evaluate(model, source, batch_size=4, protocol=protocol, resized_size=48, progress=False)["overall"]
    assert (metrics["N-acc"], metrics["T-acc"], metrics["cIoU"]) == (1.0, 0.0, 0.0)
    assert metrics["gIoU"] == pytest.approx(1 / len(GENERAL_FAMILIES))  # the no-target share, each scoring 1


def test_the_presence_threshold_decides_no_target_as_in_the_predictor():
    model = tiny_model(presence_bias=0.0, mask_bias=50.0)  # full masks
    with torch.no_grad():
        model.decoder.presence_mlp[-1].weight.zero_()  # presence exactly 0.5 for every expression
    source = SyntheticRefScenes("val", size=64, length=2 * len(GENERAL_FAMILIES), families=GENERAL_FAMILIES,
                                balanced=True)
    results = {t: evaluate(model, source, batch_size=4, presence_threshold=t, progress=False) for t in (0.4, 0.6)}
    low, high = results[0.4]["overall"], results[0.6]["overall"]
    assert (low["N-acc"], low["T-acc"]) == (0.0, 1.0)  # every answer a (full) mask
    assert (high["N-acc"], high["T-acc"]) == (1.0, 0.0)  # every answer "no match"
    assert results[0.6]["presence_threshold"] == 0.6
    assert model.training  # the caller's model as it was: tiny_model builds it in training mode
