"""One-GPU check in bf16: training throughput and memory, inference speed, and a DDP smoke run.

    python benchmarks/gpu_check.py            # CUDA: sharedris_base and sharedris_large at 480 px
    python benchmarks/gpu_check.py --tiny     # CPU: sharedris_tiny at its size, tiny batches and steps

For each model, on random inputs (speed and memory do not depend on the values):

- training steps (forward, segmentation loss, backward, AdamW step) under bf16 autocast at per-GPU
  batch 8 and 16, with and without gradient checkpointing of the encoder: samples/s and peak memory
  (``torch.cuda.max_memory_allocated``, which includes weights, gradients and optimizer state);
- inference at bf16 as :class:`sharedris.runtime.ModelRunner` runs it: latency at batch 1 and
  throughput at batch 32.

Then ``torchrun --nproc_per_node=1 -m sharedris train`` runs a few steps on synthetic data, so the
distributed path is known to work. A cell that runs out of GPU memory prints OOM; the rest go on.
Everything is printed as one table at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sharedris import build_model
from sharedris.losses import segmentation_loss
from sharedris.modeling.segmenter import SharedRIS
from sharedris.precision import autocast_context
from sharedris.runtime import ModelRunner

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """What to measure: models, batch sizes and step counts."""

    device: torch.device
    models: tuple[str, ...]
    train_batches: tuple[int, ...]
    infer_batch: int
    steps: int  # timed steps per cell, after one warm-up step
    ddp_overrides: tuple[str, ...]


def _plan(tiny: bool, steps: int | None) -> Plan:
    if tiny:
        return Plan(torch.device("cpu"), ("sharedris_tiny",), (2, 4), 4, steps or 2,
                    ("batch_size=4", "data.synthetic_train_size=8", "data.synthetic_eval_size=4", "amp=none"))
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: CUDA is not available; use --tiny for the CPU version")
    return Plan(torch.device("cuda"), ("sharedris_base", "sharedris_large"), (8, 16), 32, steps or 10,
                ("batch_size=8", "data.synthetic_train_size=64", "data.synthetic_eval_size=16", "amp=bf16"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(model: SharedRIS, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images (B, 3, S, S), token ids (B, L) and a padding mask (B, L) with half the text padded."""
    cfg = model.config
    size, length = cfg.image_size, cfg.text_len
    ids = torch.randint(0, cfg.encoder.vocab_size, (batch, length), device=device)
    pad = torch.zeros(batch, length, dtype=torch.bool, device=device)
    pad[:, length // 2:] = True
    return torch.randn(batch, 3, size, size, device=device), ids, pad


def _cell(device: torch.device, fn: Callable[[], dict[str, str]]) -> dict[str, str]:
    """``fn()``'s columns, or OOM; peak memory since the cell started is added on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row = fn()
    except torch.OutOfMemoryError:
        row = {"samples/s": "OOM", "latency ms": "OOM"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda" and row.get("samples/s") != "OOM":
        row["peak GiB"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}"
    return row


def _train_cell(model: SharedRIS, batch: int, checkpointing: bool, plan: Plan) -> dict[str, str]:
    def run() -> dict[str, str]:
        model.train()
        model.encoder.set_grad_checkpointing(checkpointing)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        image, ids, pad = _inputs(model, batch, plan.device)
        target = (torch.rand(batch, 1, *image.shape[-2:], device=plan.device) > 0.5).float()
        try:
            for i in range(plan.steps + 1):  # step 0 warms up (and allocates the optimizer state)
                if i == 1:
                    _sync(plan.device)
                    start = time.perf_counter()
                with autocast_context(plan.device, torch.bfloat16):
                    logits = model(image, ids, pad).mask_logits
                segmentation_loss(logits, target)["loss"].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            _sync(plan.device)
            return {"samples/s": f"{batch * plan.steps / (time.perf_counter() - start):.1f}"}
        finally:
            optimizer.zero_grad(set_to_none=True)
            model.encoder.set_grad_checkpointing(False)
    return _cell(plan.device, run)


def _infer_cells(model: SharedRIS, plan: Plan) -> list[tuple[str, int, dict[str, str]]]:
    runner = ModelRunner(model, plan.device, "bf16")

    def timed(batch: int) -> list[float]:
        inputs = _inputs(model, batch, plan.device)
        times = []
        for i in range(plan.steps + 1):
            _sync(plan.device)
            start = time.perf_counter()
            runner(*inputs)
            _sync(plan.device)
            if i > 0:  # the first call warms up
                times.append(time.perf_counter() - start)
        return times

    latency = _cell(plan.device, lambda: {"latency ms": f"{statistics.median(timed(1)) * 1e3:.1f}"})
    throughput = _cell(plan.device, lambda: {
        "samples/s": f"{plan.infer_batch / statistics.median(timed(plan.infer_batch)):.1f}"})
    return [("infer bf16 latency", 1, latency), ("infer bf16 throughput", plan.infer_batch, throughput)]


def _ddp_smoke(plan: Plan) -> dict[str, str]:
    """A few training steps through torchrun with one process, on synthetic data."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "sharedris", "train",
               "--config", str(ROOT / "configs" / "synthetic_tiny.yaml"), "--device", plan.device.type,
               f"out_dir={tmp}/run", "epochs=1", "stem_pretrain.steps=0", "data.num_workers=0", "log_every=1",
               *plan.ddp_overrides]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - start
        log = Path(tmp) / "run" / "log.jsonl"
        steps = len(log.read_text().splitlines()) if log.is_file() else 0
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
    status = "ok" if done.returncode == 0 and steps > 0 else f"FAILED (exit {done.returncode})"
    return {"samples/s": status, "latency ms": f"{steps} steps, {seconds:.0f} s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, sharedris_tiny, tiny batches and steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 10; 2 with --tiny)")
    args = parser.parse_args()
    plan = _plan(args.tiny, args.steps)
    torch.manual_seed(0)
    rows: list[tuple[str, str, int, str, dict[str, str]]] = []
    for name in plan.models:
        model = build_model(name).to(plan.device)
        for batch in plan.train_batches:
            for checkpointing in (False, True):
                row = _train_cell(model, batch, checkpointing, plan)
                rows.append((name, "train bf16", batch, "on" if checkpointing else "off", row))
                print(name, "train", batch, checkpointing, row, flush=True)
        for test, batch, row in _infer_cells(model, plan):
            rows.append((name, test, batch, "-", row))
            print(name, test, batch, row, flush=True)
        del model
        gc.collect()
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    rows.append(("sharedris_tiny", "ddp smoke (torchrun, 1 proc)", 4 if args.tiny else 8, "-", _ddp_smoke(plan)))

    device = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU"
    print(f"\ngpu_check on {device}, torch {torch.__version__}, {plan.steps} timed steps per cell")
    header = f"{'model':<16} {'test':<30} {'batch':>5} {'ckpt':>4} {'samples/s':>10} {'latency ms':>18} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    for name, test, batch, ckpt, row in rows:
        print(f"{name:<16} {test:<30} {batch:>5} {ckpt:>4} {row.get('samples/s', '-'):>10} "
              f"{row.get('latency ms', '-'):>18} {row.get('peak GiB', '-'):>8}")


if __name__ == "__main__":
    main()
