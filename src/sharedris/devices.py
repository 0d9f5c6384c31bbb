"""Turning a user's device string ("cpu", "cuda", "cuda:1") into a ``torch.device``, checked up front,
setting up the process for running models on the CPU, and reading sharedris's on/off switches.

Every command that takes ``--device`` goes through :func:`resolve_device`, so a typo or a GPU that
is not there is one sentence before any model is loaded, not a traceback from deep inside torch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

DEVICE_HELP = "cpu, cuda or cuda:N"
MALLOC_SWITCH = "SHAREDRIS_MALLOC_TUNING"  # "off" (or 0, false, no): leave the C library's malloc as it is
# glibc's mallopt() parameters (malloc.h) and the values set: the largest mmap threshold glibc
# accepts on 64-bit systems (32 MiB), and a trim threshold far above any activation's size.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def switched_off(variable: str) -> bool:
    """Whether environment variable ``variable`` says "off" (or 0, false, no): sharedris's switches."""
    return os.environ.get(variable, "").strip().lower() in {"off", "0", "false", "no"}


class DeviceError(ValueError):
    """A device string that names no usable device; the message says why."""


def resolve_device(text: str | torch.device) -> torch.device:
    """``text`` as a ``torch.device`` that exists on this machine.

    Raises:
        DeviceError: ``text`` is neither ``cpu``, ``cuda`` nor ``cuda:N``; CUDA is not available;
            or GPU ``N`` does not exist.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise DeviceError(f"unknown device {str(text)!r}; use {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(text)!r} needs CUDA, which is not available on this machine "
                              "(no NVIDIA GPU, or a CPU-only torch build); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {str(text)!r} does not exist: this machine has {count} CUDA "
                              f"device(s), cuda:0 to cuda:{count - 1}")
    return device


@functools.cache
def keep_freed_memory() -> bool:
    """Let the C library's malloc keep freed memory for reuse; called before a model runs on the CPU.

    PyTorch's CPU tensors come from ``malloc``. glibc's defaults serve large blocks from fresh
    ``mmap`` regions and hand freed memory back to the kernel, so the activations of every forward
    pass land on new pages, each mapped by a page fault on first write. This sets glibc's mmap
    threshold to 32 MiB (its maximum) and its trim threshold to 1 GiB, so blocks up to 32 MiB are
    reused from the heap instead (`sharedris_base`'s fp32 pass at 480 px: about 9,200 page faults
    per pass before, about 700 after; docs/benchmarks.md has the times). The process then keeps
    its peak heap until it exits, as PyTorch's GPU caching allocator does.

    Process-wide, once. Linux with glibc only; elsewhere, or with ``SHAREDRIS_MALLOC_TUNING=off``,
    it does nothing. Returns whether it applied.
    """
    if switched_off(MALLOC_SWITCH):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
