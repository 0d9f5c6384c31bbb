"""The one evaluation loop: train-time validation and `sharedris eval` both call :func:`evaluate`."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from sharedris.data.datasets import RISSamples, collate
from sharedris.data.sample import Source
from sharedris.data.transforms import mask_to_tensor
from sharedris.distributed import rank_world
from sharedris.metrics import METRIC_KEYS, GRESMeter, RISMeter
from sharedris.predictor import Predictor
from sharedris.progress import progress as progress_bar
from sharedris.runtime import DEFAULT_DEVICE, DEFAULT_PRECISION, DEFAULT_PRESENCE_THRESHOLD, DEFAULT_RUNTIME
from sharedris.text import Tokenizer

PROTOCOLS = ("original", "resized")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: Source,
    tokenizer: Tokenizer | None = None,
    *,
    device: torch.device | str = DEFAULT_DEVICE,
    precision: str = DEFAULT_PRECISION,
    runtime: str = DEFAULT_RUNTIME,
    presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD,
    batch_size: int = 16,
    num_workers: int = 0,
    protocol: str = "original",
    resized_size: int = 480,
    groups: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model on every sample of ``source``, through the predictor's forward pass.

    Under torch.distributed each rank scores the samples ``rank::world`` (no padding, no
    duplicates) and the integer sums are all-reduced, so the result equals a single-process run.

    Args:
        model: a Shared-RIS model; its ``config`` gives the preprocessing.
        tokenizer: default: the model's own (see :class:`~sharedris.predictor.Predictor`).
        precision, runtime, presence_threshold: as for :class:`~sharedris.predictor.Predictor`,
            whose post-processing decides every answer (the model itself is left as it is).
        protocol: ``"original"`` scores at each image's original size (logits resized
            bilinearly); ``"resized"`` scores prediction and ground truth at
            ``resized_size`` x ``resized_size`` (LAVT's protocol).
        groups: breakdown keys (values of the samples' ``group``) to report separately; default:
            the source's ``groups`` (e.g. the synthetic expression families). Every rank must
            pass the same list.
    Returns:
        ``{"overall": metrics, "groups": {name: metrics}, "num_samples": n, "protocol": ...,
        "precision": ..., "runtime": ..., "presence_threshold": ...}``. Each metrics dict holds the keys of
        :func:`sharedris.metrics.compute_ris_metrics` over the expressions that refer to something
        (None when there are none) and ``cIoU``, ``gIoU``, ``N-acc``, ``T-acc`` of
        :func:`sharedris.metrics.compute_gres_metrics` over all of them, "no target" being the
        predictor's "no match" (:meth:`~sharedris.predictor.Predictor.postprocess`: presence below
        the threshold, or no mask pixel at the size scored).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    rank, world = rank_world()
    predictor = Predictor(model, tokenizer, device=device, precision=precision, runtime=runtime,
                          presence_threshold=presence_threshold)
    cfg = predictor.config
    groups = getattr(source, "groups", ()) if groups is None else groups
    samples = RISSamples(source, cfg.image_size, cfg.mean, cfg.std, keep_original_mask=True)
    loader = DataLoader(samples, batch_size=batch_size, sampler=range(rank, len(samples), world),
                        num_workers=num_workers, collate_fn=collate)
    per_group = {g: (RISMeter(), GRESMeter()) for g in groups}
    overall = (RISMeter(), GRESMeter())
    for batch in progress_bar(loader, desc="eval", disable=not progress or rank != 0, leave=False):
        ids, pad = predictor.tokenizer(batch["text"])
        output = predictor.forward(batch["image"], ids, pad)
        for i, gt in enumerate(batch["orig_mask"]):
            if protocol == "resized":
                gt = mask_to_tensor(gt, resized_size)[0].numpy() > 0.5
            pred = predictor.postprocess(output.rows(i, i + 1), *gt.shape)  # "no match": an empty mask
            mask, absent = pred.masks[0], not pred.matched[0]
            for ris, gres in [overall] + ([per_group[batch["group"][i]]] if batch["group"][i] in per_group else []):
                if gt.any():  # oIoU, mIoU and P@X are over expressions that refer to something
                    ris.update(mask, gt)
                gres.update(mask, gt, absent)
    for meter in (*overall, *(m for pair in per_group.values() for m in pair)):
        meter.all_reduce_()
    if overall[1].count == 0:
        raise ValueError("the evaluation set is empty")
    return {
        "overall": _metrics(*overall),
        "groups": {g: _metrics(*pair) for g, pair in per_group.items() if pair[1].count > 0},
        "num_samples": overall[1].count,
        "protocol": protocol if protocol == "original" else f"resized{resized_size}",
        "precision": predictor.precision,
        "runtime": predictor.runtime,
        "presence_threshold": predictor.presence_threshold,
    }


def _metrics(ris: RISMeter, gres: GRESMeter) -> dict[str, float | None]:
    """oIoU/mIoU/P@X over target expressions (None where there are none) and the GRES metrics.

    GRES's Pr@X equals P@X here (a "no match" answer is an empty mask), so it is not repeated.
    """
    values: dict[str, float | None] = ris.compute() if ris.count else dict.fromkeys(METRIC_KEYS)
    values.update({k: v for k, v in gres.compute().items() if k not in values})
    return values
