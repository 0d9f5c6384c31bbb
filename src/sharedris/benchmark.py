"""Timing helpers and the `sharedris bench` measurements (ratios measured side by side in one run)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from sharedris.modeling.beit3 import BEiT3, BEiT3Config


def median_seconds(fns: dict[str, Callable[[], object]], runs: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each ``fn()`` over ``runs`` calls after ``warmup`` calls, in inference mode.

    The functions are called in turn within each round, so that noise from other work on the
    machine falls on all of them alike and their ratios stay meaningful.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(runs):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_encoder(sizes: list[int], runs: int = 5, text_len: int = 20, batch: int = 1,
                  reference: bool = False, model: str = "base") -> list[dict[str, float]]:
    """Time our BEiT-3 encoder (and optionally torchscale's, on identical weights) per image size.

    Returns one row per size: ``size``, ``ours_s`` and, with ``reference``, ``reference_s``,
    ``speedup`` (reference / ours) and ``max_abs_diff`` of the two outputs.
    """
    rows = []
    for size in sizes:
        cfg = getattr(BEiT3Config, model)(image_size=size)
        torch.manual_seed(0)
        ours = BEiT3(cfg).eval()
        g = torch.Generator().manual_seed(0)
        image = torch.randn(batch, 3, size, size, generator=g)
        ids = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
        pad = torch.zeros(batch, text_len, dtype=torch.bool)
        row: dict[str, float] = {"size": size}
        fns: dict[str, Callable[[], object]] = {"ours_s": lambda: ours(image, ids, pad)}
        if reference:
            from sharedris.reference import torchscale_beit3

            ref = torchscale_beit3(cfg).eval()
            with tempfile.TemporaryDirectory() as tmp:  # identical weights, through our real loader
                path = Path(tmp) / "ref.pth"
                torch.save({"model": {f"beit3.{k}": v for k, v in ref.state_dict().items()}}, path)
                ours.load_official_checkpoint(path)
            fns["reference_s"] = lambda: ref(textual_tokens=ids, visual_tokens=image,
                                             text_padding_position=pad)["encoder_out"]
            with torch.inference_mode():
                row["max_abs_diff"] = (fns["reference_s"]() - fns["ours_s"]()).abs().max().item()
        row.update(median_seconds(fns, runs=runs))
        if reference:
            row["speedup"] = row["reference_s"] / row["ours_s"]
        rows.append(row)
    return rows
