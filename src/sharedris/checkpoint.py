"""Crash-safe file writing, the user's and output folders, and the training-resume file.

Every file is written to a temporary name in the same folder, flushed to disk, then renamed over
the target: a crash mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class FolderError(ValueError):
    """A folder that cannot be created or written to; the message names it and says why."""


def home_dir() -> Path:
    """The user's sharedris folder (fetched weights, converted models): ``$SHAREDRIS_HOME``, else
    ``~/.cache/sharedris``."""
    return Path(os.environ.get("SHAREDRIS_HOME") or Path.home() / ".cache" / "sharedris").expanduser()


def writable_dir(path: str | Path, what: str = "folder") -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written there.

    Call it before long work, so that a bad output path fails first. ``what`` names the folder in
    the message ("output folder").

    Raises:
        FolderError: ``path`` is a file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FolderError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FolderError(f"cannot create {what} {path} ({(e.strerror or str(e)).lower()})") from None
    if not os.access(path, os.W_OK):
        raise FolderError(f"{what} {path} is not writable")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync, then atomically rename to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600 files, and some writers (safetensors) replace the file: set the usual
        # permissions on what was written.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_resume_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Write the resume file (model, optimizer, scheduler, RNG states, step, config) atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume_state(path: str | Path) -> dict[str, Any]:
    """Read a resume file without executing pickled code (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"resume file {path} holds objects other than tensors and plain data; "
                         f"refusing to load it ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"resume file {path} is not readable ({e})") from None
