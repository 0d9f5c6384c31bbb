"""Numeric precision for inference (``fp32 | bf16 | int8 | auto``) and for training (``amp``).

One place decides which precision runs where, so that ``auto`` never picks a path slower than fp32:

- bf16 is fast on CUDA GPUs that support it natively (``torch.cuda.is_bf16_supported``) and on CPUs
  with bf16 matrix instructions, AMX (``amx_bf16``/``amx_tile``) or AVX-512-BF16 (``avx512_bf16``),
  which oneDNN uses for bf16 matmuls. Elsewhere bf16 is emulated and slower than fp32.
- int8 is dynamic quantization of the ``nn.Linear`` layers (int8 weights, activations quantized per
  call), a CPU inference path; it is never chosen by ``auto`` because it changes results more.

bf16 inference casts a copy of the whole model to bf16 and runs it under autocast. Casting rather than
autocast alone saves converting every fp32 weight to bf16 on every forward pass: ``sharedris_base`` at
480 px, batch 1, ran 2.8x faster than fp32 cast vs 2.35x with autocast alone on an AMX Xeon, and
2.0-2.4x vs 1.9-2.1x (one thread, AVX-512-BF16 AMD EPYC, two runs alternating the variants); the mask
logits of a random-init model differed from fp32 by at most 0.0044 vs 0.0031. Autocast still wraps the call so that fp32 inputs (the image) meet
bf16 weights. The caller's model is never changed: bf16 and int8 work on a deep copy, whose outputs a
forward hook turns back into float32, so mask logits are float32 at every precision.

int8 uses torchao (``quantize_`` with ``Int8DynamicActivationInt8WeightConfig``), the maintained
successor of ``torch.ao.quantization.quantize_dynamic``, which torch marks deprecated. torchao has no
dependency on a particular torch wheel (its wheel metadata lists none), so it installs beside the CPU
torch; it is optional (the ``int8`` extra: ``pip install 'sharedris[int8]'``) and imported only when int8 is asked for.
"""

from __future__ import annotations

import contextlib
import logging
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "int8", "auto")
AMP_CHOICES = ("auto", "bf16", "fp16", "none")

# CPU feature flags (as /proc/cpuinfo and torch.cpu.get_capabilities spell them) that give fast bf16
# matmuls: AMX tiles, or the AVX-512 bf16 dot-product instructions.
_FAST_BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


class PrecisionError(ValueError):
    """A precision or amp setting that this machine cannot run, or does not know; the message says why."""


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (bf16 or fp16) on ``device``'s type, CPU included; nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first ``flags`` line of ``path`` (Linux x86) as a set; empty when the file or line is missing."""
    try:
        text = path.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX-512-BF16) that torch can use.

    Reads ``torch.cpu.get_capabilities()`` (torch's cpuinfo-based detection, keys ``amx_bf16``,
    ``amx_tile``, ``avx512_bf16``) when this torch has it, else the ``flags`` line of ``/proc/cpuinfo``
    (Linux). Also requires ``torch.backends.mkldnn.is_available()``: without oneDNN, torch has no
    kernels that use those instructions.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        caps = get_capabilities()
        return any(caps.get(flag, False) is True for flag in _FAST_BF16_FLAGS)
    return bool(_cpuinfo_flags() & set(_FAST_BF16_FLAGS))


def _cuda_has_bf16() -> bool:
    # Without emulation: emulated bf16 on pre-Ampere GPUs is slower than fp32.
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _fast_bf16(device: torch.device) -> bool:
    """Whether bf16 runs faster than fp32 on ``device``."""
    return _cuda_has_bf16() if device.type == "cuda" else cpu_has_fast_bf16()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision (``fp32``, ``bf16`` or ``int8``) that ``precision`` means on ``device``.

    ``auto`` is bf16 where bf16 is fast (CUDA GPUs with native bf16, CPUs with AMX or AVX-512-BF16)
    and fp32 elsewhere; it never picks int8. Explicit choices are kept as given.

    Raises:
        PrecisionError: ``precision`` is not one of :data:`PRECISIONS`, or is int8 on a CUDA device.
    """
    if precision not in PRECISIONS:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "int8" and device.type == "cuda":
        raise PrecisionError("precision int8 (dynamic quantization) runs on CPU only; on a GPU use bf16")
    if precision == "auto":
        return "bf16" if _fast_bf16(device) else "fp32"
    return precision


def _to_float32(out: Any) -> Any:
    """``out`` (a tensor, or a tuple or NamedTuple of them) with floating-point tensors as float32."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        items = [_to_float32(o) for o in out]
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    return out


def _float32_outputs_hook(module: nn.Module, args: Any, out: Any) -> Any:
    return _to_float32(out)


def _quantize_int8(model: nn.Module) -> None:
    """Quantize ``model``'s ``nn.Linear`` layers in place: int8 weights, dynamically quantized int8 activations."""
    # Importing torchao logs a warning for each of its CUDA kernel libraries that a CPU torch cannot
    # load (CPU quantization does not use them) and torch logs one about torchao's pytree registrations.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise PrecisionError("precision int8 needs the torchao package; install it with "
                             "`pip install 'sharedris[int8]'` (or `pip install torchao`)") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())


def prepare_model(model: nn.Module, precision: str, device: torch.device | str,
                  copy: bool = True) -> tuple[nn.Module, torch.dtype | None]:
    """The model to run for ``precision`` on ``device``, and the autocast dtype to run it under.

    Run it as ``with autocast_context(device, dtype): out = model_to_run(...)``. Floating-point
    outputs (the (B, 1, H, W) mask logits) are float32 at every precision.

    - fp32: ``(model, None)``.
    - bf16: a copy of ``model`` cast to bf16, and ``torch.bfloat16``.
    - int8: a copy with dynamically quantized ``nn.Linear`` layers, and None (CPU only).
    - auto: as :func:`resolve_precision` decides.

    ``model`` should already be on ``device``; it is never modified, unless ``copy`` is False (the
    caller hands over a private copy, converted in place to save memory).

    Raises:
        PrecisionError: as :func:`resolve_precision`; or int8 without torchao installed.
    """
    concrete = resolve_precision(precision, device)
    if concrete == "fp32":
        return model, None
    run = deepcopy(model) if copy else model
    if concrete == "bf16":
        run.to(torch.bfloat16)
        dtype = torch.bfloat16
    else:
        _quantize_int8(run)
        dtype = None
    run.register_forward_hook(_float32_outputs_hook)
    return run, dtype


def training_amp_dtype(amp: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for training with ``amp`` (one of :data:`AMP_CHOICES`) on ``device``.

    ``auto`` is bf16 where bf16 is fast (see :func:`resolve_precision`) and None (fp32) elsewhere;
    ``none`` is None.

    Raises:
        PrecisionError: ``amp`` is unknown; fp16 on CPU; or bf16 on a device where it is slower than fp32.
    """
    if amp not in AMP_CHOICES:
        raise PrecisionError(f"unknown amp {amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    device = torch.device(device)
    if amp == "auto":
        return torch.bfloat16 if _fast_bf16(device) else None
    if amp == "fp16" and device.type == "cpu":
        raise PrecisionError("amp=fp16 needs a GPU; on CPU use amp=auto or amp=none")
    if amp == "bf16" and not _fast_bf16(device):
        raise PrecisionError(f"amp=bf16 would be slower than fp32 on {device} (no native bf16); use amp=none")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
