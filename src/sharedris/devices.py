"""Turning a user's device string ("cpu", "cuda", "cuda:1") into a ``torch.device``, checked up front.

Every command that takes ``--device`` goes through :func:`resolve_device`, so a typo or a GPU that
is not there is one sentence before any model is loaded, not a traceback from deep inside torch.
"""

from __future__ import annotations

import torch

DEVICE_HELP = "cpu, cuda or cuda:N"


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
