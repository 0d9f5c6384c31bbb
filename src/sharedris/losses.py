"""Training loss of Shared-RIS: one term per model output (the mask: weighted BCE plus soft Dice; the
presence, IoU and anchor heads), and optionally a ranking of a relation's candidates by the mask.

:func:`referring_loss` is what the training loop calls; its keyword arguments are the fields of
``LossConfig`` (the training config's ``loss`` section), and it returns every term by name, which
the loop logs as it finds them. A new head adds its output field, its term here and its weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sharedris.modeling.segmenter import SegmenterOutput


class RelationTargets(NamedTuple):
    """What a batch's relation expressions ("the circle farthest from the purple triangle") add to
    the training targets, for ``loss.anchor_weight`` and ``loss.rank_weight``.

    anchors: (B, 1, H, W) float, the mask of each pair's anchor (empty without one).
    has_anchor: (B,) bool, whether the pair's expression is a relation with an anchor.
    candidates: (B, K, H, W) bool, the objects the expression chooses between (those of the
        referent's shape), the referent first; empty masks pad the rest.
    """

    anchors: torch.Tensor
    has_anchor: torch.Tensor
    candidates: torch.Tensor


RANK_TEMPERATURE = 4.0  # mask logits per nat of the ranking term: a candidate 16 logits above another is 4 nats


def referring_loss(output: SegmenterOutput, target: torch.Tensor, relations: RelationTargets | None = None, *,
                   bce_weight: float = 2.0, dice_weight: float = 0.5, presence_weight: float = 0.5,
                   iou_weight: float = 1.0, anchor_weight: float = 1.0,
                   rank_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The weighted sum of every term for a batch of model outputs.

    - mask: ``bce_weight * BCE + dice_weight * Dice`` (:func:`segmentation_loss`). An expression that
      refers to nothing has an empty target, so its mask is trained towards empty.
    - presence (with a presence head): BCE of the presence logit against "the target is not empty".
    - iou (with an IoU head): squared error between the predicted IoU and the IoU of the model's own
      thresholded mask with the target, detached (1 when both are empty), as SAM trains its IoU head.
    - anchor (with anchor logits, ``decoder.anchor_point``): the mask term of the anchor's logits
      against ``relations.anchors``, on the pairs whose ``has_anchor`` is True; 0 when none is.
    - rank (with ``rank_weight`` > 0): on the relation pairs, cross-entropy of picking the referent
      among ``relations.candidates`` by each candidate's mean mask logit (divided by
      :data:`RANK_TEMPERATURE`): the decision a relation asks for, scored once per expression
      rather than per pixel.

    Args:
        output: the model's output for a batch.
        target: ``Bx1xHxW`` or ``BxHxW`` ground-truth masks at the logits' resolution.
        relations: the batch's :class:`RelationTargets`, at the logits' resolution (needed with anchor
            logits or ``rank_weight`` > 0).
        bce_weight, dice_weight, presence_weight, iou_weight, anchor_weight, rank_weight: weights
            of the terms (``LossConfig``).
    Returns:
        ``{"loss": weighted sum, "bce": ..., "dice": ..., "presence": ..., "iou": ..., "anchor": ...,
        "rank": ...}`` (terms unweighted, float32 scalars; a head's term only when the model has
        that head, ``rank`` only with ``rank_weight`` > 0).
    """
    terms = segmentation_loss(output.mask_logits, target, bce_weight, dice_weight)
    loss = terms["loss"]
    with torch.autocast(device_type=target.device.type, enabled=False):
        present = target.flatten(1).any(dim=1).float()  # (B,)
        if output.presence_logits is not None:
            terms["presence"] = F.binary_cross_entropy_with_logits(output.presence_logits.float(), present)
            loss = loss + presence_weight * terms["presence"]
        if output.iou_pred is not None:
            pred = (output.mask_logits.detach() > 0).flatten(1)  # (B, H*W)
            gt = target.flatten(1) > 0.5
            inter = (pred & gt).sum(dim=1).float()
            union = (pred | gt).sum(dim=1).float()
            real_iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            terms["iou"] = F.mse_loss(output.iou_pred.float(), real_iou)
            loss = loss + iou_weight * terms["iou"]
    if (output.anchor_logits is not None or rank_weight > 0) and relations is None:
        raise ValueError("a model with anchor logits (decoder.anchor_point) or a loss with rank_weight > 0 "
                         "trains on the relations' anchors and candidates: pass relations")
    if output.anchor_logits is not None:
        has = relations.has_anchor
        if has.any():
            terms["anchor"] = segmentation_loss(output.anchor_logits[has], relations.anchors[has],
                                                bce_weight, dice_weight)["loss"]
        else:  # still a term of the graph, so that every step's anchor head takes a (zero) gradient
            terms["anchor"] = output.anchor_logits.float().sum() * 0
        loss = loss + anchor_weight * terms["anchor"]
    if rank_weight > 0:
        terms["rank"] = ranking_loss(output.mask_logits, relations)
        loss = loss + rank_weight * terms["rank"]
    terms["loss"] = loss
    return terms


def ranking_loss(logits: torch.Tensor, relations: RelationTargets) -> torch.Tensor:
    """Mean cross-entropy of picking the referent (candidate 0) by the candidates' mean mask logits.

    Scored on the pairs with an anchor whose referent and at least one other candidate keep pixels
    at this resolution; 0 (still reaching the logits) when there is none. Float32.

    Args:
        logits: (B, 1, H, W) mask logits.
        relations: the batch's :class:`RelationTargets`, at the logits' resolution.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        cand = relations.candidates.float()  # (B, K, H, W)
        area = cand.sum(dim=(2, 3))  # (B, K)
        means = (cand * logits.float()).sum(dim=(2, 3)) / area.clamp(min=1)  # (B, K)
        valid = area > 0
        used = relations.has_anchor & valid[:, 0] & (valid.sum(dim=1) >= 2)
        if not used.any():
            return logits.float().sum() * 0
        scores = (means / RANK_TEMPERATURE).masked_fill(~valid, float("-inf"))[used]
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=logits.device))


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 2.0,
    dice_weight: float = 0.5,
) -> dict[str, torch.Tensor]:
    """Compute ``bce_weight * BCE + dice_weight * Dice`` for one-channel mask logits.

    BCE is the mean over all pixels of the batch. Dice is ``1 - (2Σpt + 1) / (Σp + Σt + 1)``
    per sample on ``p = sigmoid(logits)``, averaged over the batch; the +1 keeps it defined
    (and 0 for an all-negative prediction) when the target is empty. Everything runs in
    float32, also under autocast, because half-precision sums over large masks lose pixels.

    Args:
        logits: ``Bx1xHxW`` float mask logits.
        target: ``Bx1xHxW`` or ``BxHxW`` ground-truth masks, bool or float in ``[0, 1]``.
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.

    Returns:
        ``{"loss": weighted sum, "bce": BCE, "dice": Dice}``, each a float32 scalar tensor;
        ``bce`` and ``dice`` are unweighted.
    """
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be Bx1xHxW, got shape {tuple(logits.shape)}")
    if target.dim() == 3:
        target = target.unsqueeze(1)  # (B, 1, H, W)
    if target.shape != logits.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}; "
            "resize the target to the logits' resolution (Bx1xHxW or BxHxW)"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        target = target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        probs = logits.sigmoid().flatten(1)  # (B, H*W)
        target = target.flatten(1)  # (B, H*W)
        overlap = (probs * target).sum(dim=1)  # (B,)
        dice = 1 - (2 * overlap + 1) / (probs.sum(dim=1) + target.sum(dim=1) + 1)
        dice = dice.mean()
        loss = bce_weight * bce + dice_weight * dice
    return {"loss": loss, "bce": bce, "dice": dice}
