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


def _sdpa_flops(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], *args: object, **kwargs: object) -> int:
    """FLOPs of CPU flash attention (not in torch's own table): QK^T and AV, 2 per multiply-add."""
    b, h, n, d = q
    return 2 * b * h * n * k[-2] * d + 2 * b * h * n * k[-2] * v[-1]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops()


def _measure_model(name: str, runs: int, threads: int, throughput_batch: int) -> dict[str, float]:
    """One model's figures; run in a fresh process so that its peak memory is its own."""
    import resource

    from sharedris.modeling.registry import build_model, model_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config(name)
    model = build_model(cfg).eval()
    S, L = cfg.image_size, cfg.text_len

    def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.randint(4, cfg.encoder.vocab_size, (batch, L))
        pad = torch.zeros(batch, L, dtype=torch.bool)
        pad[:, L // 2:] = True  # typical expressions are short
        return torch.randn(batch, 3, S, S), ids, pad

    one, many = inputs(1), inputs(throughput_batch)
    times = median_seconds({
        "latency_s": lambda: model(*one),
        "encoder_s": lambda: model.encoder.forward_intermediates(*one, model.taps),
        "batch_s": lambda: model(*many),
    }, runs=runs)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "gflops": count_flops(lambda: model(*one)) / 1e9,
        "latency_s": times["latency_s"],
        "head_share": 1.0 - times["encoder_s"] / times["latency_s"],
        "throughput": throughput_batch / times["batch_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_models(names: list[str], runs: int = 3, threads: int = 2, throughput_batch: int = 8) -> dict[str, dict]:
    """Size, FLOPs, latency, throughput and peak memory per model, each measured in its own process.

    ``head_share`` is the fraction of the batch-1 forward time spent after the encoder
    (Shared FPN + Mask Decoder).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        with ctx.Pool(1) as pool:
            out[name] = pool.apply(_measure_model, (name, runs, threads, throughput_batch))
    return out


def bench_training(steps: int = 10, batch: int = 16, threads: int = 2, name: str = "sharedris_tiny") -> float:
    """Training samples/s of ``name`` (forward, loss, backward, AdamW step) at ``batch``."""
    from sharedris.losses import segmentation_loss
    from sharedris.modeling.registry import build_model, model_config

    torch.set_num_threads(threads)
    cfg = model_config(name)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(4, cfg.encoder.vocab_size, (batch, cfg.text_len))
    pad = torch.zeros(batch, cfg.text_len, dtype=torch.bool)
    target = (torch.rand(batch, 1, cfg.image_size, cfg.image_size) > 0.8).float()

    def step() -> None:
        segmentation_loss(model(image, ids, pad).mask_logits, target)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)
