"""The one evaluation loop: train-time validation and `sharedris eval` both call :func:`evaluate`."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from sharedris.data.datasets import RISSamples, Source, collate
from sharedris.data.transforms import mask_to_tensor, resize_logits
from sharedris.metrics import RISMeter
from sharedris.text import Tokenizer

PROTOCOLS = ("original", "resized")


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on an accelerator, or nothing (CPU paths run fp32)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: Source,
    tokenizer: Tokenizer,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    protocol: str = "original",
    resized_size: int = 480,
    amp_dtype: torch.dtype | None = None,
    groups: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model on every sample of ``source``.

    Under torch.distributed each rank scores the samples ``rank::world`` (no padding, no
    duplicates) and the integer sums are all-reduced, so the result equals a single-process run.

    Args:
        protocol: ``"original"`` scores at each image's original size (logits resized
            bilinearly); ``"resized"`` scores prediction and ground truth at
            ``resized_size`` x ``resized_size`` (LAVT's protocol).
        groups: breakdown keys (the samples' ``family``) to report separately, e.g. the synthetic
            expression families. Every rank must pass the same list.
    Returns:
        ``{"overall": metrics, "groups": {name: metrics}, "num_samples": n, "protocol": ...}``
        with the keys of :func:`sharedris.metrics.compute_ris_metrics` in each metrics dict.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    device = torch.device(device)
    rank, world = _rank_world()
    samples = RISSamples(source, image_size, mean, std, keep_original_mask=True)
    loader = DataLoader(samples, batch_size=batch_size, sampler=range(rank, len(samples), world),
                        num_workers=num_workers, collate_fn=collate)
    overall = RISMeter()
    per_group = {g: RISMeter() for g in groups}
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc="eval", disable=not progress or rank != 0, leave=False):
        ids, pad = tokenizer(batch["text"])
        with autocast_context(device, amp_dtype):
            logits = model(batch["image"].to(device), ids.to(device), pad.to(device))  # (B, 1, S, S)
        for i, gt in enumerate(batch["orig_mask"]):
            if protocol == "original":
                pred = resize_logits(logits[i, 0], *gt.shape) > 0
            else:
                pred = resize_logits(logits[i, 0], resized_size, resized_size) > 0
                gt = mask_to_tensor(gt, resized_size)[0].numpy() > 0.5
            pred_np = pred.cpu().numpy()
            overall.update(pred_np, gt)
            family = batch["family"][i]
            if family in per_group:
                per_group[family].update(pred_np, gt)
    model.train(was_training)
    for meter in (overall, *per_group.values()):
        meter.all_reduce_()
    if overall.count == 0:
        raise ValueError("the evaluation set is empty")
    return {
        "overall": overall.compute(),
        "groups": {g: m.compute() for g, m in per_group.items() if m.count > 0},
        "num_samples": overall.count,
        "protocol": protocol if protocol == "original" else f"resized{resized_size}",
    }

