"""Referring-segmentation metrics: oIoU, mIoU and Prec@X (LAVT ``test.py``), and the GRES metrics.

Per sentence ``i`` with predicted mask ``P`` and ground truth ``G`` (both ``HxW`` booleans):
``I_i = |P ∩ G|`` and ``U_i = |P ∪ G|`` are integers.

- ``oIoU`` (a.k.a. cIoU, overall IoU) = ``Σ I_i / Σ U_i`` (0 when ``Σ U_i == 0``).
- ``mIoU`` = mean of ``I_i / U_i``, an empty union counting as IoU 0.
- ``P@X`` = share of sentences with ``IoU >= X`` for ``X`` in :data:`THRESHOLDS`.

GRES metrics (gRefCOCO; ReLA's ``refer_evaluation.py`` after its 2023-08 fix, docs/reference.md)
also take each sample's "no target" decision ``n_i``: an input, the caller's (for
:func:`sharedris.evaluate.evaluate`, the predictor's "no match"), which this module never derives
from the predicted mask. A ground truth has no target exactly
when its mask is empty (gRefCOCO's no-target expressions).

- No target: ``g_i = 1`` if ``n_i`` else 0; ``I_i = 0``; ``U_i = 0`` if ``n_i`` else ``|P|``.
- A target: ``I_i = 0`` if ``n_i`` else ``|P ∩ G|``; ``U_i = |P ∪ G|``; ``g_i = I_i / U_i``.
- ``cIoU`` = ``Σ I_i / Σ U_i`` (0 when ``Σ U_i == 0``); ``gIoU`` = mean of ``g_i``;
  ``N-acc`` = share of no-target samples with ``n_i``; ``T-acc`` = share of target samples
  without ``n_i``; ``P@X`` = share of target samples with ``g_i >= X`` for ``X`` in
  :data:`GRES_THRESHOLDS`. A share over no samples is None: the metric does not apply (N-acc
  without no-target samples; T-acc and P@X without target samples).

All values are fractions in ``[0, 1]``; :func:`format_table` prints them as percentages.
Which resolution the masks are scored at (LAVT/ReLA: 480x480; CRIS/EVF-SAM: original image
size) is the caller's choice; this module only counts pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from itertools import zip_longest
from typing import Any, Self

import numpy as np
import torch
import torch.distributed as dist

THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS: tuple[str, ...] = ("oIoU", "mIoU", *(f"P@{t}" for t in THRESHOLDS))
GRES_THRESHOLDS: tuple[float, ...] = (0.7, 0.8, 0.9)
GRES_METRIC_KEYS: tuple[str, ...] = ("cIoU", "gIoU", "N-acc", "T-acc", *(f"P@{t}" for t in GRES_THRESHOLDS))

Mask = np.ndarray | torch.Tensor


def _exact(thresholds: tuple[float, ...]) -> tuple[Fraction, ...]:
    # Thresholds as exact rationals so that ``IoU >= X`` is decided on integers: an IoU of exactly
    # 3/5 must count for P@0.6 however large U is, which a float division cannot promise.
    return tuple(Fraction(repr(t)) for t in thresholds)


_EXACT_THRESHOLDS = _exact(THRESHOLDS)
_EXACT_GRES_THRESHOLDS = _exact(GRES_THRESHOLDS)


def _reaches(intersection: int, union: int, threshold: Fraction) -> bool:
    """``intersection / union >= threshold``, decided exactly (``union > 0``)."""
    return intersection * threshold.denominator >= threshold.numerator * union


def _check_masks(pred: Mask, gt: Mask) -> None:
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} differs from gt shape {tuple(gt.shape)}")
    both_torch = isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor)
    dtypes = (pred.dtype, gt.dtype) if both_torch else (np.asarray(pred).dtype, np.asarray(gt).dtype)
    if any(d not in (torch.bool, np.bool_) for d in dtypes):
        raise ValueError(f"masks must be boolean, got {dtypes[0]} and {dtypes[1]}; "
                         "threshold them first (e.g. logits > 0)")


def _intersection_union(pred: Mask, gt: Mask) -> tuple[int, int]:
    """Count ``|P ∩ G|`` and ``|P ∪ G|`` of two boolean masks of the same shape (``HxW``)."""
    _check_masks(pred, gt)
    if isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor):
        # Counting on the tensors' own device avoids copying whole masks to the host.
        return int((pred & gt).sum().item()), int((pred | gt).sum().item())
    pred, gt = np.asarray(pred), np.asarray(gt)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def _is_nonempty(mask: Mask) -> bool:
    """Whether a boolean mask (already checked by :func:`_check_masks`) has a True pixel."""
    return bool(mask.any().item()) if isinstance(mask, torch.Tensor) else bool(np.any(mask))


def _flag(value: Any, name: str) -> bool:
    """A Python/NumPy bool or a one-element bool array/tensor -> bool; anything else is refused."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        is_bool = value.dtype in (torch.bool, np.bool_)
        if is_bool and (value.numel() if isinstance(value, torch.Tensor) else value.size) == 1:
            return bool(value.item())
    elif isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be a bool (threshold the presence score first), got {value!r}")


def _all_reduce_sums(counts: np.ndarray, float_sums: np.ndarray,
                     device: torch.device | str | None) -> tuple[np.ndarray, np.ndarray]:
    """Sum an int64 and a float64 array over all ranks of the initialised process group.

    ``device`` defaults to the current CUDA device for the NCCL backend (which cannot reduce CPU
    tensors) and to CPU otherwise.
    """
    if device is None:
        nccl = dist.get_backend() == dist.Backend.NCCL
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu"
    counts_t = torch.from_numpy(counts).to(device)  # int64: exact sums
    float_sums_t = torch.from_numpy(float_sums).to(device)  # float64
    dist.all_reduce(counts_t)
    dist.all_reduce(float_sums_t)
    return counts_t.cpu().numpy(), float_sums_t.cpu().numpy()


class _SummingMeter:
    """Integer counters and one float64 sum, all plain sums over samples: mergeable across workers.

    Counters are Python ints (exported as int64), so every ratio of counters is exact and
    independent of summation order, including after :meth:`all_reduce_`. ``iou_sum`` sums
    per-sample float64 IoUs, so it matches a single-process run up to float64 rounding of the
    summation order (~1e-15 relative). Subclasses list their counters in :meth:`_counts`.
    """

    iou_sum: float

    def _counts(self) -> list[int]:
        raise NotImplementedError

    def _set_counts(self, counts: list[int]) -> None:
        raise NotImplementedError

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the accumulated state as ``(counts, iou_sum)``.

        ``counts`` is int64 of shape ``(C,)`` laid out as the class docstring says; ``iou_sum``
        is float64 of shape ``(1,)``. Both are plain sums, so the states of disjoint sample sets
        add up to the state of their union.
        """
        return np.array(self._counts(), dtype=np.int64), np.array([self.iou_sum], dtype=np.float64)

    @classmethod
    def from_state(cls, counts: np.ndarray, iou_sum: np.ndarray) -> Self:
        """Rebuild a meter from the output of :meth:`state` (or a sum of such outputs)."""
        meter = cls()
        meter._load_state(counts, iou_sum)
        return meter

    def _load_state(self, counts: np.ndarray, iou_sum: np.ndarray) -> None:
        counts = np.asarray(counts).reshape(-1)
        expected = len(self._counts())
        if counts.shape != (expected,):
            raise ValueError(f"counts must have {expected} entries, got shape {counts.shape}")
        self._set_counts([int(c) for c in counts])
        self.iou_sum = float(np.asarray(iou_sum, dtype=np.float64).reshape(-1)[0])

    def merge(self, other: Self) -> Self:
        """Add ``other``'s samples to this meter in place; returns ``self``."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self._set_counts([a + b for a, b in zip(self._counts(), other._counts())])
        self.iou_sum += other.iou_sum
        return self

    def all_reduce_(self, device: torch.device | str | None = None) -> Self:
        """Sum this meter over all ranks in place; a no-op without ``torch.distributed``.

        Args:
            device: where the reduced tensors live. Defaults to the current CUDA device for
                the NCCL backend (which cannot reduce CPU tensors) and to CPU otherwise.

        Returns:
            ``self``, now holding the samples of every rank.
        """
        if dist.is_available() and dist.is_initialized():
            self._load_state(*_all_reduce_sums(*self.state(), device))
        return self


class RISMeter(_SummingMeter):
    """Accumulates RIS metrics (oIoU, mIoU, P@X) one sentence at a time; mergeable across workers.

    ``state()`` counts: ``[ΣI, ΣU, count, hits per threshold]``, shape ``(3 + T,)`` with
    ``T = len(THRESHOLDS)``; ``iou_sum``: the sum of per-sentence IoUs (see :class:`_SummingMeter`
    for what is exact).
    """

    def __init__(self) -> None:
        self.intersection_sum = 0
        self.union_sum = 0
        self.count = 0
        self.iou_sum = 0.0
        self.hits = [0] * len(THRESHOLDS)  # sentences with IoU >= each of THRESHOLDS

    def _counts(self) -> list[int]:
        return [self.intersection_sum, self.union_sum, self.count, *self.hits]

    def _set_counts(self, counts: list[int]) -> None:
        self.intersection_sum, self.union_sum, self.count = counts[:3]
        self.hits = counts[3:]

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
            self.hits[k] += _reaches(intersection, union, threshold)

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


class GRESMeter(_SummingMeter):
    """Accumulates the GRES metrics (cIoU, gIoU, N-acc, T-acc, P@X) one sample at a time.

    The rules are the module docstring's. ``state()`` counts: ``[ΣI, ΣU, target samples,
    no-target samples, target samples predicted present, no-target samples predicted absent, hits
    per threshold]``, shape ``(6 + T,)`` with ``T = len(GRES_THRESHOLDS)``; ``iou_sum``: the sum of
    ``g_i`` over target samples (each no-target sample predicted absent adds an exact 1 on top, from
    the counts). Mergeable and all-reducible across workers like :class:`RISMeter`.
    """

    def __init__(self) -> None:
        self.intersection_sum = 0
        self.union_sum = 0
        self.targets = 0  # samples whose ground truth has a target
        self.no_targets = 0  # samples whose ground truth is empty
        self.targets_found = 0  # target samples predicted present (ReLA's "TN")
        self.no_targets_found = 0  # no-target samples predicted absent (ReLA's "TP")
        self.iou_sum = 0.0
        self.hits = [0] * len(GRES_THRESHOLDS)  # target samples with g_i >= each of GRES_THRESHOLDS

    def _counts(self) -> list[int]:
        return [self.intersection_sum, self.union_sum, self.targets, self.no_targets,
                self.targets_found, self.no_targets_found, *self.hits]

    def _set_counts(self, counts: list[int]) -> None:
        (self.intersection_sum, self.union_sum, self.targets, self.no_targets,
         self.targets_found, self.no_targets_found) = counts[:6]
        self.hits = counts[6:]

    def update(self, pred: Mask, gt: Mask, predicted_no_target: bool) -> None:
        """Add one sample from its boolean masks and the model's no-target decision.

        Args:
            pred: ``HxW`` boolean numpy array or torch tensor (any device): the predicted mask.
            gt: ``HxW`` boolean mask of the same shape and kind; empty exactly when the expression
                refers to nothing.
            predicted_no_target: True when the model says the expression refers to nothing (e.g.
                the predictor's "no match"); a bool or a one-element bool array/tensor.
        """
        intersection, union = _intersection_union(pred, gt)
        self.add(intersection, union, _is_nonempty(gt), predicted_no_target)

    def add(self, intersection: int, union: int, has_target: bool, predicted_no_target: bool) -> None:
        """Add one sample from ``I = |P ∩ G|``, ``U = |P ∪ G|``, whether ``G`` is non-empty and ``n_i``."""
        intersection, union = int(intersection), int(union)
        has_target = _flag(has_target, "has_target")
        predicted_no_target = _flag(predicted_no_target, "predicted_no_target")
        if not 0 <= intersection <= union:
            raise ValueError(f"need 0 <= intersection <= union, got {intersection} and {union}")
        if not has_target:
            if intersection:
                raise ValueError(f"a sample without a target cannot have an intersection, got {intersection}")
            self.no_targets += 1
            if predicted_no_target:
                self.no_targets_found += 1  # g_i = 1, I_i = U_i = 0
            else:
                self.union_sum += union  # g_i = 0, U_i = |P|
            return
        if union == 0:
            raise ValueError("a sample with a target has a non-empty union, got 0")
        self.targets += 1
        if predicted_no_target:
            intersection = 0  # the target was missed, whatever the mask shows
        else:
            self.targets_found += 1
        self.intersection_sum += intersection
        self.union_sum += union
        self.iou_sum += intersection / union
        for k, threshold in enumerate(_EXACT_GRES_THRESHOLDS):
            self.hits[k] += _reaches(intersection, union, threshold)

    @property
    def count(self) -> int:
        """Samples added so far (target and no-target)."""
        return self.targets + self.no_targets

    def compute(self) -> dict[str, float | None]:
        """Return ``{"cIoU", "gIoU", "N-acc", "T-acc", "P@0.7", "P@0.8", "P@0.9"}`` as fractions in ``[0, 1]``,
        None for a share over no samples (N-acc without no-target samples, T-acc and P@X without targets)."""
        count = self.targets + self.no_targets
        if count == 0:
            raise ValueError("no samples were added to the meter; cannot compute metrics")
        results = {
            "cIoU": self.intersection_sum / self.union_sum if self.union_sum else 0.0,
            "gIoU": (self.iou_sum + self.no_targets_found) / count,
            "N-acc": self.no_targets_found / self.no_targets if self.no_targets else None,
            "T-acc": self.targets_found / self.targets if self.targets else None,
        }
        for threshold, hits in zip(GRES_THRESHOLDS, self.hits):
            results[f"P@{threshold}"] = hits / self.targets if self.targets else None
        return results


def _zip_samples(**columns: Iterable[Any]) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """``enumerate(zip(*columns))`` that raises ValueError when the columns differ in length."""
    missing = object()
    for index, row in enumerate(zip_longest(*columns.values(), fillvalue=missing)):
        if any(v is missing for v in row):
            raise ValueError(f"{' and '.join(columns)} differ in length: one of them ends at index {index}")
        yield index, row


def compute_ris_metrics(preds: Iterable[Mask], gts: Iterable[Mask]) -> dict[str, float]:
    """Score predicted masks against ground truths, one pair per sentence.

    Args:
        preds: iterable of ``HxW`` boolean masks.
        gts: iterable of boolean masks, each the same shape as its prediction.

    Returns:
        ``{"oIoU", "mIoU", "P@0.5", ..., "P@0.9"}`` as fractions in ``[0, 1]``.
    """
    meter = RISMeter()
    for index, (pred, gt) in _zip_samples(preds=preds, gts=gts):
        try:
            meter.update(pred, gt)
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from None
    if meter.count == 0:
        raise ValueError("preds and gts are empty; need at least one sentence to score")
    return meter.compute()


def compute_gres_metrics(preds: Iterable[Mask], gts: Iterable[Mask],
                         no_target_preds: Iterable[bool]) -> dict[str, float]:
    """Score predictions on generalized referring expressions (gRefCOCO), one triple per sample.

    Args:
        preds: iterable of ``HxW`` boolean predicted masks.
        gts: iterable of boolean ground-truth masks, each the same shape as its prediction; empty
            exactly for expressions that refer to nothing.
        no_target_preds: the model's "no target" decision per sample (e.g. the predictor's
            "no match"), an input, not derived here from the predicted mask.

    Returns:
        ``{"cIoU", "gIoU", "N-acc", "T-acc", "P@0.7", "P@0.8", "P@0.9"}`` as fractions in ``[0, 1]``
        (None where a share has no samples)
        (rules in the module docstring).
    """
    meter = GRESMeter()
    for index, (pred, gt, no_target) in _zip_samples(preds=preds, gts=gts, no_target_preds=no_target_preds):
        try:
            meter.update(pred, gt, no_target)
        except ValueError as err:
            raise ValueError(f"sample {index}: {err}") from None
    if meter.targets + meter.no_targets == 0:
        raise ValueError("preds, gts and no_target_preds are empty; need at least one sample to score")
    return meter.compute()


def format_table(results: Mapping[str, Mapping[str, float | None]]) -> str:
    """Render metrics as a text table, one row per name (split, dataset family...).

    Args:
        results: ``{row name: metrics}``: the output of :func:`compute_ris_metrics`, optionally
            with the GRES keys ``cIoU``, ``gIoU``, ``N-acc``, ``T-acc`` (shown when any row has
            them); values are fractions, or None (shown as "-") where a metric has no samples.

    Returns:
        The table with columns ``oIoU, mIoU, P@0.5..P@0.9`` (then the GRES ones) as percentages
        with 2 decimals.
    """
    gres = [k for k in GRES_METRIC_KEYS if not k.startswith("P@") and any(k in m for m in results.values())]
    columns = [*METRIC_KEYS, *gres]
    name_width = max([len("split"), *(len(name) for name in results)])
    widths = [max(len(key), len("100.00")) for key in columns]
    header = (f"{key:>{width}}" for key, width in zip(columns, widths))
    lines = ["  ".join([f"{'split':<{name_width}}", *header])]
    for name, metrics in results.items():
        missing = [key for key in columns if key not in metrics]
        if missing:
            raise ValueError(
                f"row {name!r} lacks {missing}; pass the output of compute_ris_metrics"
            )
        cells = ("-".rjust(w) if metrics[k] is None else f"{100 * metrics[k]:>{w}.2f}" for k, w in zip(columns, widths))
        lines.append("  ".join([f"{name:<{name_width}}", *cells]))
    return "\n".join(lines)
