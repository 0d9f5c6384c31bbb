"""Referring-segmentation metrics: oIoU, mIoU and Prec@X, the LAVT ``test.py`` convention.

Per sentence ``i`` with predicted mask ``P`` and ground truth ``G`` (both ``HxW`` booleans):
``I_i = |P ∩ G|`` and ``U_i = |P ∪ G|`` are integers.

- ``oIoU`` (a.k.a. cIoU, overall IoU) = ``Σ I_i / Σ U_i`` (0 when ``Σ U_i == 0``).
- ``mIoU`` = mean of ``I_i / U_i``, an empty union counting as IoU 0.
- ``P@X`` = share of sentences with ``IoU >= X`` for ``X`` in :data:`THRESHOLDS`.

All values are fractions in ``[0, 1]``; :func:`format_table` prints them as percentages.
Which resolution the masks are scored at (LAVT/ReLA: 480x480; CRIS/EVF-SAM: original image
size) is the caller's choice; this module only counts pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fractions import Fraction
from itertools import zip_longest

import numpy as np
import torch
import torch.distributed as dist

THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS: tuple[str, ...] = ("oIoU", "mIoU", *(f"P@{t}" for t in THRESHOLDS))

# Thresholds as exact rationals so that ``IoU >= X`` is decided on integers: an IoU of exactly
# 3/5 must count for P@0.6 however large U is, which a float division cannot promise.
_EXACT_THRESHOLDS: tuple[Fraction, ...] = tuple(Fraction(repr(t)) for t in THRESHOLDS)

Mask = np.ndarray | torch.Tensor


def _intersection_union(pred: Mask, gt: Mask) -> tuple[int, int]:
    """Count ``|P ∩ G|`` and ``|P ∪ G|`` of two boolean masks of the same shape (``HxW``)."""
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}")
    if isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor):
        # Counting on the tensors' own device avoids copying whole masks to the host.
        if pred.dtype != torch.bool or gt.dtype != torch.bool:
            raise ValueError(
                f"masks must be boolean, got {pred.dtype} and {gt.dtype}; "
                "threshold them first (e.g. logits > 0)"
            )
        return int((pred & gt).sum().item()), int((pred | gt).sum().item())
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.dtype != np.bool_ or gt.dtype != np.bool_:
        raise ValueError(
            f"masks must be boolean, got {pred.dtype} and {gt.dtype}; "
            "threshold them first (e.g. logits > 0)"
        )
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


class RISMeter:
    """Accumulates RIS metrics one sentence at a time; mergeable across workers.

    Pixel and sentence counters are Python ints (exported as int64), so ``oIoU`` and ``P@X``
    are exact and independent of summation order, including after :meth:`all_reduce_`. ``mIoU``
    sums per-sentence float64 IoUs, so it matches a single-process run up to float64 rounding
    of the summation order (~1e-15 relative).
    """

    def __init__(self) -> None:
        self.intersection_sum = 0
        self.union_sum = 0
        self.count = 0
        self.iou_sum = 0.0
        self.hits = [0] * len(THRESHOLDS)  # sentences with IoU >= each of THRESHOLDS

    def update(self, pred: Mask, gt: Mask) -> None:
        """Add one sentence from its predicted and ground-truth boolean masks.

        Args:
            pred: ``HxW`` boolean numpy array or torch tensor (any device).
            gt: ``HxW`` boolean mask of the same shape and kind.
        """
        self.add(*_intersection_union(pred, gt))

    def add(self, intersection: int, union: int) -> None:
        """Add one sentence from its pixel counts ``I = |P ∩ G|`` and ``U = |P ∪ G|``."""
        intersection, union = int(intersection), int(union)
        if not 0 <= intersection <= union:
            raise ValueError(f"need 0 <= intersection <= union, got {intersection} and {union}")
        self.intersection_sum += intersection
        self.union_sum += union
        self.count += 1
        if union == 0:
            return  # IoU 0: adds nothing to iou_sum and reaches no threshold
        self.iou_sum += intersection / union
        for k, threshold in enumerate(_EXACT_THRESHOLDS):
            if intersection * threshold.denominator >= threshold.numerator * union:
                self.hits[k] += 1

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the accumulated state as ``(counts, iou_sum)``.

        ``counts`` is int64 of shape ``(3 + T,)``: ``[ΣI, ΣU, count, hits per threshold]``
        with ``T = len(THRESHOLDS)``; ``iou_sum`` is float64 of shape ``(1,)``. Both are plain
        sums, so the states of disjoint sample sets add up to the state of their union.
        """
        counts = np.array(
            [self.intersection_sum, self.union_sum, self.count, *self.hits], dtype=np.int64
        )
        return counts, np.array([self.iou_sum], dtype=np.float64)

    @classmethod
    def from_state(cls, counts: np.ndarray, iou_sum: np.ndarray) -> RISMeter:
        """Rebuild a meter from the output of :meth:`state` (or a sum of such outputs)."""
        meter = cls()
        meter._load_state(counts, iou_sum)
        return meter

    def _load_state(self, counts: np.ndarray, iou_sum: np.ndarray) -> None:
        counts = np.asarray(counts).reshape(-1)
        if counts.shape != (3 + len(THRESHOLDS),):
            raise ValueError(
                f"counts must have {3 + len(THRESHOLDS)} entries, got shape {counts.shape}"
            )
        self.intersection_sum, self.union_sum, self.count = (int(c) for c in counts[:3])
        self.hits = [int(c) for c in counts[3:]]
        self.iou_sum = float(np.asarray(iou_sum, dtype=np.float64).reshape(-1)[0])

    def merge(self, other: RISMeter) -> RISMeter:
        """Add ``other``'s sentences to this meter in place; returns ``self``."""
        self.intersection_sum += other.intersection_sum
        self.union_sum += other.union_sum
        self.count += other.count
        self.iou_sum += other.iou_sum
        self.hits = [a + b for a, b in zip(self.hits, other.hits)]
        return self

    def all_reduce_(self, device: torch.device | str | None = None) -> RISMeter:
        """Sum this meter over all ranks in place; a no-op without ``torch.distributed``.

        Args:
            device: where the reduced tensors live. Defaults to the current CUDA device for
                the NCCL backend (which cannot reduce CPU tensors) and to CPU otherwise.

        Returns:
            ``self``, now holding the sentences of every rank.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        if device is None:
            nccl = dist.get_backend() == dist.Backend.NCCL
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
        counts, iou_sum = self.state()
        counts_t = torch.from_numpy(counts).to(device)  # int64: exact sums
        iou_sum_t = torch.from_numpy(iou_sum).to(device)  # float64
        dist.all_reduce(counts_t)
        dist.all_reduce(iou_sum_t)
        self._load_state(counts_t.cpu().numpy(), iou_sum_t.cpu().numpy())
        return self

    def compute(self) -> dict[str, float]:
        """Return ``{"oIoU", "mIoU", "P@0.5", ..., "P@0.9"}`` as fractions in ``[0, 1]``."""
        if self.count == 0:
            raise ValueError("no sentences were added to the meter; cannot compute metrics")
        results = {
            "oIoU": self.intersection_sum / self.union_sum if self.union_sum else 0.0,
            "mIoU": self.iou_sum / self.count,
        }
        for threshold, hits in zip(THRESHOLDS, self.hits):
            results[f"P@{threshold}"] = hits / self.count
        return results


def compute_ris_metrics(preds: Iterable[Mask], gts: Iterable[Mask]) -> dict[str, float]:
    """Score predicted masks against ground truths, one pair per sentence.

    Args:
        preds: iterable of ``HxW`` boolean masks.
        gts: iterable of boolean masks, each the same shape as its prediction.

    Returns:
        ``{"oIoU", "mIoU", "P@0.5", ..., "P@0.9"}`` as fractions in ``[0, 1]``.
    """
    meter = RISMeter()
    missing = object()
    for index, (pred, gt) in enumerate(zip_longest(preds, gts, fillvalue=missing)):
        if pred is missing or gt is missing:
            raise ValueError(f"preds and gts differ in length: one of them ends at index {index}")
        try:
            meter.update(pred, gt)
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from None
    if meter.count == 0:
        raise ValueError("preds and gts are empty; need at least one sentence to score")
    return meter.compute()


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Render metrics as a text table, one row per name (split, dataset family...).

    Args:
        results: ``{row name: output of compute_ris_metrics}``; values are fractions.

    Returns:
        The table with columns ``oIoU, mIoU, P@0.5..P@0.9`` as percentages with 2 decimals.
    """
    name_width = max([len("split"), *(len(name) for name in results)])
    widths = [max(len(key), len("100.00")) for key in METRIC_KEYS]
    header = (f"{key:>{width}}" for key, width in zip(METRIC_KEYS, widths))
    lines = ["  ".join([f"{'split':<{name_width}}", *header])]
    for name, metrics in results.items():
        missing = [key for key in METRIC_KEYS if key not in metrics]
        if missing:
            raise ValueError(
                f"row {name!r} lacks {missing}; pass the output of compute_ris_metrics"
            )
        cells = (f"{100 * metrics[k]:>{w}.2f}" for k, w in zip(METRIC_KEYS, widths))
        lines.append("  ".join([f"{name:<{name_width}}", *cells]))
    return "\n".join(lines)
