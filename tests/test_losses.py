"""Segmentation loss: magnitudes, weighting, shapes and gradients."""

from __future__ import annotations

import pytest
import torch

from sharedris.losses import RANK_TEMPERATURE, RelationTargets, ranking_loss, referring_loss, segmentation_loss
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


def _relations(has: torch.Tensor, anchors: torch.Tensor, candidates: torch.Tensor | None = None) -> RelationTargets:
    if candidates is None:
        candidates = torch.zeros(len(has), 3, *anchors.shape[-2:], dtype=torch.bool)
    return RelationTargets(anchors, has, candidates)


def test_the_anchor_term_scores_only_pairs_that_have_an_anchor() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    anchor_logits, anchors = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    has = torch.tensor([True, False, True])
    plain = referring_loss(SegmenterOutput(logits), target)
    with_anchor = SegmenterOutput(logits, anchor_logits=anchor_logits)
    terms = referring_loss(with_anchor, target, _relations(has, anchors), anchor_weight=0.5)
    want = segmentation_loss(anchor_logits[has], anchors[has])["loss"]
    assert torch.allclose(terms["anchor"], want) and "rank" not in terms
    assert torch.allclose(terms["loss"], plain["loss"] + 0.5 * want)
    # what the pair without an anchor holds changes nothing
    other = anchors.clone()
    other[1] = 1 - other[1]
    assert torch.equal(referring_loss(with_anchor, target, _relations(has, other))["anchor"], terms["anchor"])
    # a batch without any anchor: a zero term that still reaches the anchor logits
    anchor_logits.requires_grad_(True)
    none = referring_loss(with_anchor, target, _relations(torch.zeros(3, dtype=torch.bool), anchors))
    none["loss"].backward()
    assert none["anchor"] == 0 and torch.allclose(none["loss"], plain["loss"]) and anchor_logits.grad is not None
    with pytest.raises(ValueError, match="pass relations"):
        referring_loss(with_anchor, target)
    with pytest.raises(ValueError, match="pass relations"):
        referring_loss(SegmenterOutput(logits), target, rank_weight=1.0)


def test_the_ranking_term_by_hand() -> None:
    candidates = torch.zeros(3, 4, 2, 4, dtype=torch.bool)
    candidates[:, 0, :, 0] = True  # the referent: column 0
    candidates[:, 1, :, 1:3] = True  # another candidate: columns 1-2
    candidates[0, 2, 0, 3] = True  # a third, in pair 0 only; slot 3 stays empty (padding)
    logits = torch.zeros(3, 1, 2, 4)
    logits[:, 0, :, 0] = 8.0
    logits[:, 0, 0, 1:3] = 4.0  # candidate 1: 4, 4, 0, 0, mean 2
    logits[:, 0, 0, 3] = 12.0
    has = torch.tensor([True, True, False])
    got = ranking_loss(logits, _relations(has, torch.zeros(3, 1, 2, 4), candidates))
    t = RANK_TEMPERATURE
    pair0 = -torch.log_softmax(torch.tensor([8.0, 2.0, 12.0]) / t, 0)[0]  # the empty slot takes no share
    pair1 = -torch.log_softmax(torch.tensor([8.0, 2.0]) / t, 0)[0]
    assert torch.allclose(got, (pair0 + pair1) / 2)  # pair 2 has no anchor: not scored
    terms = referring_loss(SegmenterOutput(logits), torch.zeros(3, 1, 2, 4), _relations(has, torch.zeros(3, 1, 2, 4),
                                                                                        candidates), rank_weight=0.25)
    assert torch.allclose(terms["rank"], got)
    assert torch.allclose(terms["loss"], referring_loss(SegmenterOutput(logits), torch.zeros(3, 1, 2, 4))["loss"] + 0.25 * got)
    # a referent lost at this resolution, or alone: nothing to rank, a zero term that reaches the logits
    alone = candidates.clone()
    alone[1, 0] = False
    alone[0, 1:] = False
    logits.requires_grad_(True)
    zero = ranking_loss(logits, _relations(has, torch.zeros(3, 1, 2, 4), alone))
    zero.backward()
    assert zero == 0 and logits.grad is not None
