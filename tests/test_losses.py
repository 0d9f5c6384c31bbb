"""Segmentation loss: magnitudes, weighting, shapes and gradients."""

from __future__ import annotations

import pytest
import torch

from sharedris.losses import referring_loss, segmentation_loss
from sharedris.modeling import SegmenterOutput


def target_and_confident_logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 8, 8, generator=generator) < 0.4  # (B, 1, H, W)
    logits = torch.where(target, 20.0, -20.0)
    return target, logits


def test_perfect_logits_give_small_loss_and_wrong_logits_a_large_one() -> None:
    target, logits = target_and_confident_logits()
    good = segmentation_loss(logits, target)
    bad = segmentation_loss(-logits, target)
    assert good["loss"].item() < 1e-3
    assert bad["loss"].item() > 10 * 2.0  # BCE ~ 20 per pixel when confidently wrong
    assert bad["dice"].item() > 0.9


def test_empty_target_and_negative_logits_give_zero_dice() -> None:
    target = torch.zeros(3, 16, 16, dtype=torch.bool)  # (B, H, W) is accepted too
    logits = torch.full((3, 1, 16, 16), -30.0)
    assert segmentation_loss(logits, target)["dice"].item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_weighted_sum_and_weights_are_respected() -> None:
    target, _ = target_and_confident_logits()
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = segmentation_loss(logits, target.float(), bce_weight=2.0, dice_weight=0.5)
    assert out["loss"].item() == pytest.approx(2.0 * out["bce"].item() + 0.5 * out["dice"].item())
    dice_only = segmentation_loss(logits, target, bce_weight=0.0, dice_weight=1.0)
    assert dice_only["loss"].item() == pytest.approx(out["dice"].item())
    expected_bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float())
    assert out["bce"].item() == pytest.approx(expected_bce.item())


def test_dice_matches_hand_computation() -> None:
    # logits 0 -> p = 0.5 everywhere; 2x2 mask with one positive pixel:
    # dice = 1 - (2 * 0.5 + 1) / (4 * 0.5 + 1 + 1) = 1 - 2 / 4 = 0.5.
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    out = segmentation_loss(torch.zeros(1, 1, 2, 2), target)
    assert out["dice"].item() == pytest.approx(0.5)


def test_gradients_flow_and_half_precision_logits_give_float32() -> None:
    target, _ = target_and_confident_logits()
    logits = torch.randn(2, 1, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    out = segmentation_loss(logits, target)
    assert all(value.dtype == torch.float32 for value in out.values())
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="does not match"):
        segmentation_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="Bx1xHxW"):
        segmentation_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


def test_the_anchor_term_scores_only_pairs_that_have_an_anchor() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    anchor_logits, anchors = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    has = torch.tensor([True, False, True])
    plain = referring_loss(SegmenterOutput(logits), target)
    terms = referring_loss(SegmenterOutput(logits, anchor_logits=anchor_logits), target, anchors, has, anchor_weight=0.5)
    want = segmentation_loss(anchor_logits[has], anchors[has])["loss"]
    assert torch.allclose(terms["anchor"], want)
    assert torch.allclose(terms["loss"], plain["loss"] + 0.5 * want)
    # what the pair without an anchor holds changes nothing
    other = anchors.clone()
    other[1] = 1 - other[1]
    assert torch.equal(referring_loss(SegmenterOutput(logits, anchor_logits=anchor_logits), target, other, has)["anchor"],
                       terms["anchor"])
    # a batch without any anchor: a zero term that still reaches the anchor logits
    anchor_logits.requires_grad_(True)
    none = referring_loss(SegmenterOutput(logits, anchor_logits=anchor_logits), target, anchors, torch.zeros(3, dtype=torch.bool))
    none["loss"].backward()
    assert none["anchor"] == 0 and torch.allclose(none["loss"], plain["loss"]) and anchor_logits.grad is not None
    with pytest.raises(ValueError, match="anchor masks"):
        referring_loss(SegmenterOutput(logits, anchor_logits=anchor_logits), target)
