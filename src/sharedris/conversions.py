"""A disk cache of model conversions, so that only a model's first start pays for converting it.

Converting a model for OpenVINO (tracing it with ``openvino.convert_model``) and compiling the
result for the CPU take seconds; :mod:`sharedris.runtime` keeps both results here and reads them
back on later starts.

Where: ``$SHAREDRIS_HOME/conversions``, else ``~/.cache/sharedris/conversions`` (the folder where
:mod:`sharedris.fetch` puts weights). ``SHAREDRIS_CONVERSION_CACHE=off`` keeps nothing.

Each entry is a folder named by a key that covers everything that changes what it holds (the
caller's business: :func:`digest` of the parts), with the entry's files and ``manifest.json``, the
size and SHA-256 of each file. The rules that keep it from crashing or lying:

- An entry is filled in a temporary folder beside the others and renamed into place in one step,
  so no reader ever sees a partial entry. Of two processes filling the same entry, one rename wins
  and the other discards its copy.
- An entry is read whole into memory and checked against its manifest before anything uses it.
  Nothing is memory-mapped: a process that removes or replaces an entry cannot pull memory from
  under another process's running model.
- A damaged entry (a file missing, cut short or changed, an unreadable manifest) is moved out of
  the way and removed, and the caller builds it again.
- A cache folder that cannot be written costs the time of converting again: one warning, and the
  model runs from memory.
- The cache stays under a size limit (``SHAREDRIS_CONVERSION_CACHE_GB``, default 8): after an
  entry is written, the entries used longest ago are removed until the rest fit (the new entry
  always stays). Reading an entry marks it used. Temporary folders left by a killed process are
  removed once they are an hour old.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

from sharedris.checkpoint import home_dir
from sharedris.devices import switched_off

SWITCH = "SHAREDRIS_CONVERSION_CACHE"  # "off" (or 0, false, no): keep no conversions
MANIFEST = "manifest.json"
LIMIT = "SHAREDRIS_CONVERSION_CACHE_GB"  # size limit of the whole cache, in GB
DEFAULT_LIMIT_GB = 8.0
STALE_SECONDS = 3600  # a temporary folder this old belongs to a process that died
# What reading an entry that is missing, half removed or damaged raises
_UNREADABLE = (OSError, ValueError, TypeError, KeyError, AttributeError)


def digest(*parts: Any) -> str:
    """SHA-256 (hex) of ``parts`` written as JSON (keys sorted): the key of an entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class ConversionCache:
    """Entries under ``root`` (see the module's docstring for the rules).

    Args:
        root: the cache folder; created when the first entry is written.
        max_bytes: size limit of all entries together; None: ``SHAREDRIS_CONVERSION_CACHE_GB``
            GB, else 8 GB.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = _limit_from_env() if max_bytes is None else max_bytes
        self._warned = False

    @classmethod
    def default(cls) -> ConversionCache | None:
        """The user's cache (``<home>/conversions``), or None when ``SHAREDRIS_CONVERSION_CACHE`` is off."""
        if switched_off(SWITCH):
            return None
        return cls(home_dir() / "conversions")

    def read(self, key: str) -> dict[str, bytes] | None:
        """The files of entry ``key`` (name -> bytes), checked against its manifest; None when the
        entry is missing or damaged (a damaged entry is removed)."""
        folder = self.root / key
        if not folder.is_dir():
            return None
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            files = {name: (folder / name).read_bytes() for name in manifest}
            if all(len(files[name]) == rec["size"] and hashlib.sha256(files[name]).hexdigest() == rec["sha256"]
                   for name, rec in manifest.items()):
                _mark_used(folder)
                return files
        except _UNREADABLE:
            pass
        self.discard(key)
        return None

    def write(self, key: str, fill: Callable[[Path], None]) -> bool:
        """Fill entry ``key``: ``fill(folder)`` writes the entry's files into an empty temporary
        folder, which then becomes the entry in one rename. Returns whether the entry is in place
        (another process's copy counts); a folder that cannot be written warns once and returns False.
        """
        tmp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.root))
            fill(tmp)
            manifest = {p.name: _file_record(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            try:
                os.rename(tmp, self.root / key)  # fails when the entry exists: another writer won
                tmp = None
            except OSError:
                if not (self.root / key).is_dir():
                    raise
            self._prune(keep=key)
            return True
        except OSError as e:
            if not self._warned:
                warnings.warn(f"cannot keep converted models in {self.root} ({e.strerror or e}); "
                              f"each start will convert again", stacklevel=3)
                self._warned = True
            return False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def discard(self, key: str) -> None:
        """Remove entry ``key`` if present: renamed away first, so readers see it whole or not at all."""
        folder = self.root / key
        trash = self.root / f".{key[:16]}.{uuid.uuid4().hex}.trash"
        try:
            os.rename(folder, trash)
        except OSError:
            return  # gone already, or another process is removing it
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Remove the entries used longest ago (never ``keep``) until the rest fit in ``max_bytes``,
        and temporary folders left by processes that died."""
        entries, now = [], time.time()
        for folder in self.root.iterdir():
            try:
                if folder.name.startswith("."):  # a temporary or trash folder
                    if now - folder.stat().st_mtime > STALE_SECONDS:
                        shutil.rmtree(folder, ignore_errors=True)
                    continue
                manifest = folder / MANIFEST
                size = sum(rec["size"] for rec in json.loads(manifest.read_text()).values())
                entries.append((manifest.stat().st_mtime, size, folder.name))
            except _UNREADABLE:
                continue  # being written, removed or damaged: read() deals with it
        total = sum(size for _, size, _ in entries)
        for _, size, key in sorted(entries):
            if total <= self.max_bytes:
                break
            if key != keep:
                self.discard(key)
                total -= size


def _mark_used(folder: Path) -> None:
    """Mark an entry as just used (its manifest's time), which decides what the size limit removes first."""
    try:
        os.utime(folder / MANIFEST)
    except OSError:
        pass  # a read-only cache: it is never written to, so never pruned either


def _limit_from_env() -> int:
    value = os.environ.get(LIMIT, "").strip()
    try:
        gigabytes = float(value) if value else DEFAULT_LIMIT_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:
        raise ValueError(f"{LIMIT}={value!r}: give the conversion cache's size limit in GB, e.g. {DEFAULT_LIMIT_GB:g}")
    return int(gigabytes * 1e9)
