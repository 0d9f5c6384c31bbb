"""Timing helpers and the `sharedris bench` measurements (ratios measured side by side in one run)."""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from sharedris.modeling.beit3 import BEiT3, BEiT3Config
from sharedris.precision import PRECISIONS, PrecisionError, autocast_context, resolve_precision
from sharedris.runtime import OPENVINO_PRECISIONS, ModelRunner


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


def registered_model_from_args(description: str) -> tuple[argparse.Namespace, torch.nn.Module]:
    """The command line of a benchmark script that times one registered model: its name, ``--threads``
    and ``--runs``; sets torch's thread count and builds the model with random weights (seed 0), in
    eval mode."""
    from sharedris.modeling.registry import build_model

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="a registered model name, e.g. sharedris_base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args, build_model(args.model).eval()


def _sdpa_flops(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...], *args: object, **kwargs: object) -> int:
    """FLOPs of CPU flash attention (not in torch's own table): QK^T and AV, 2 per multiply-add."""
    b, h, n, d = q
    return 2 * b * h * n * k[-2] * d + 2 * b * h * n * k[-2] * v[-1]


def flop_counter() -> Any:
    """A silent ``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU flash attention."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention)."""
    counter = flop_counter()
    with torch.inference_mode(), counter:
        fn()
    return counter.get_total_flops()


def cpu_description() -> str:
    """This CPU's model name and the instruction sets that decide bf16 and int8 speed, in one line.

    Read from ``torch.cpu.get_capabilities()`` (torch's cpuinfo-based detection): AMX (``amx_bf16``),
    AVX-512-BF16 (``avx512_bf16``), AVX2, and the kernel level torch dispatches to.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    caps = get_capabilities() if get_capabilities is not None else {}

    def has(flag: str) -> str:
        if flag not in caps:
            return "unknown"
        return "yes" if caps[flag] is True else "no"

    name = caps.get("cpu_name") or platform.processor() or "unknown CPU"
    return (f"CPU {name}: AMX {has('amx_bf16')}, AVX-512-BF16 {has('avx512_bf16')}, AVX2 {has('avx2')}; "
            f"torch {torch.__version__} kernels {torch.backends.cpu.get_cpu_capability()}")


def concrete_precisions(precisions: Sequence[str]) -> list[str]:
    """``precisions`` as the concrete CPU precisions they run (``auto`` resolved), in order, without repeats.

    Raises:
        PrecisionError: an unknown precision, or none at all.
    """
    if not precisions:
        raise PrecisionError(f"no precision given; list one or more of {', '.join(PRECISIONS)}")
    return list(dict.fromkeys(resolve_precision(p, "cpu") for p in precisions))


def _encoder_alone(run: ModelRunner, images: torch.Tensor, ids: torch.Tensor, pad: torch.Tensor) -> object:
    """The encoder's part of a PyTorch runner's forward pass, at its precision (to time the heads' share)."""
    with autocast_context(run.device, run.amp_dtype):
        return run.module.encoder.forward_intermediates(images, ids, pad, run.module.taps)


def _measure_model(name: str, runs: int, threads: int, throughput_batch: int,
                   precisions: list[str], runtimes: Sequence[str] = ("torch",)) -> dict[str, object]:
    """One model's figures at each concrete precision and runtime; run in a fresh process so that its
    peak memory is its own."""
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
    fns: dict[str, Callable[[], object]] = {}
    # (row key, precision, runtime)
    paths = [(p, p, "torch") for p in precisions if "torch" in runtimes]
    paths += [(f"openvino {p}", p, "openvino") for p in precisions if "openvino" in runtimes and p in OPENVINO_PRECISIONS]
    for key, precision, runtime in paths:
        run = ModelRunner(model, "cpu", precision, runtime, threads)
        # Every precision's calls go into one dict: median_seconds calls them in turn each round, so
        # the precisions of a model are timed alternately and their ratios stay meaningful under load.
        fns[f"{key}/latency"] = lambda run=run: run(*one)
        if runtime == "torch":  # OpenVINO runs the graph whole: no encoder alone
            fns[f"{key}/encoder"] = lambda run=run: _encoder_alone(run, *one)
        fns[f"{key}/batch"] = lambda run=run: run(*many)
    times = median_seconds(fns, runs=runs)
    rows: dict[str, dict[str, float | None]] = {}
    for key, _, _ in paths:
        latency, batch = times[f"{key}/latency"], times[f"{key}/batch"]
        encoder = times.get(f"{key}/encoder")
        rows[key] = {"latency_s": latency, "head_share": None if encoder is None else 1.0 - encoder / latency,
                     "throughput": throughput_batch / batch}
        if "fp32/latency" in times:
            rows[key]["latency_speedup"] = times["fp32/latency"] / latency
            rows[key]["throughput_speedup"] = times["fp32/batch"] / batch
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "gflops": count_flops(lambda: model(*one)) / 1e9,
        "precisions": rows,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_models(names: list[str], runs: int = 3, threads: int = 2, throughput_batch: int = 8,
                 precisions: Sequence[str] = ("fp32",), runtimes: Sequence[str] = ("torch",)) -> dict[str, dict]:
    """Size, FLOPs, and per precision latency, throughput and speed-up over fp32, per model on the CPU.

    Each model is measured in its own process (``peak_rss_mb`` is that process's peak, all its
    precisions' copies of the model included); within it, the precisions are timed alternately
    (see :func:`median_seconds`). Returns ``{name: {"params", "encoder_params", "gflops",
    "peak_rss_mb", "precisions": {precision: {...}}}}``, keyed by the concrete precisions of
    :func:`concrete_precisions`. Per precision: ``latency_s`` (batch 1), ``throughput`` (images/s
    at ``throughput_batch``), ``head_share`` (the fraction of the batch-1 time spent after the
    encoder: Shared FPN + Mask Decoder; None for OpenVINO, which runs the graph whole) and, when
    fp32 is among them, ``latency_speedup`` and ``throughput_speedup`` (torch fp32 time / this
    one's time). With ``"openvino"`` in ``runtimes`` (and ``"torch"`` for the PyTorch rows) fp32
    and bf16 also run through :class:`~sharedris.runtime.OpenVINOModel`, keyed ``"openvino fp32"``
    and ``"openvino bf16"``.

    Raises:
        PrecisionError: an unknown precision; or int8 without torchao installed.
    """
    import multiprocessing as mp

    concrete = concrete_precisions(precisions)
    ctx = mp.get_context("spawn")
    out = {}
    for name in names:
        with ctx.Pool(1) as pool:
            out[name] = pool.apply(_measure_model,
                                   (name, runs, threads, throughput_batch, concrete, tuple(runtimes)))
    return out


def bench_training(steps: int = 10, batch: int = 16, threads: int = 2, name: str = "sharedris_tiny") -> float:
    """Training samples/s of ``name`` (forward, loss, backward, AdamW step) at ``batch``."""
    from sharedris.losses import referring_loss
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
        referring_loss(model(image, ids, pad), target)["loss"].backward()  # the training loss, every head
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)
