"""Resumable, verified HTTP downloads with the standard library only.

A file is written to ``<final>.part`` and renamed to its final name only once it is complete and
verified, so a file under the final name is always whole. An interrupted download (Ctrl-C, a
dropped connection, a crash) resumes from the ``.part`` file with an HTTP ``Range`` request; a
server that ignores ``Range`` is detected (status 200 instead of 206) and the file restarts.
Where the expected SHA-256 is known a mismatch is refused and the partial file removed; where it
is not, the digest that was seen is written to ``<final>.sha256`` so a later copy can be compared.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sharedris.progress import progress as progress_bar

CHUNK = 1 << 20  # bytes per read; also the granularity of progress updates
USER_AGENT = "sharedris-fetch (python urllib)"


class DownloadError(ValueError):
    """A download that cannot complete (unreachable source, wrong size or checksum); one sentence."""


@dataclass(frozen=True)
class Remote:
    """One downloadable file.

    Args:
        name: the file name it is stored under (also its key for ``--url NAME=URL``).
        urls: sources tried in order; a later one is a fallback for an earlier one that fails.
        size: expected size in bytes, None when unknown.
        sha256: expected hex digest, None when the source publishes none.
    """

    name: str
    urls: tuple[str, ...]
    size: int | None = None
    sha256: str | None = None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _human(n: float) -> str:
    """A byte count in decimal units: "950 B", "12.3 MB"."""
    if n < 1000:
        return f"{int(n)} B"
    exponent = min(3, int(math.log10(n) // 3))
    return f"{n / 1000 ** exponent:.1f} {'KMG'[exponent - 1]}B"


def _total_from(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size a response implies (Content-Range total, else offset + Content-Length)."""
    match = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


class _Dropped(Exception):
    """The connection ended before the file did; retried with resume."""


def _fetch_into(url: str, part: Path, progress_name: str, timeout: float) -> int | None:
    """Append ``url``'s remaining bytes to ``part``; return the file's full size when the server says it.

    Raises:
        _Dropped: the transfer stopped early (resumable).
        urllib.error.HTTPError / URLError / OSError: the server refused or could not be reached.
    """
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left after offset: the .part already holds the whole file
            return offset
        raise
    with response:
        if offset and response.status != 206:  # the server ignored Range and sends the whole file
            offset = 0
        total = _total_from(response, offset)
        progress = progress_bar(total=total, initial=offset, desc=progress_name, unit="B", unit_scale=True,
                                leave=False)
        try:
            with open(part, "ab" if offset else "wb") as f:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                        raise _Dropped(str(e) or type(e).__name__) from None
                    if not block:
                        break
                    f.write(block)
                    progress.update(len(block))
        finally:
            progress.close()
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Dropped(f"connection closed at {size} of {total} bytes")
    return total


class _Failed(Exception):
    """One URL gave up (HTTP error status, or retries exhausted); the next URL is tried."""


def _fetch_with_retries(url: str, part: Path, name: str, retries: int, retry_wait: float,
                        timeout: float) -> int | None:
    """:func:`_fetch_into` with resumed retries after a dropped connection, a network error or a 5xx."""
    for attempt in range(retries + 1):
        try:
            return _fetch_into(url, part, name, timeout)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise _Failed(f"HTTP {e.code}") from None
            reason = f"HTTP {e.code}"
        except (_Dropped, urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        if attempt == retries:
            raise _Failed(reason)
        print(f"{name}: {reason}; resuming (retry {attempt + 1} of {retries})", file=sys.stderr, flush=True)
        time.sleep(retry_wait * (attempt + 1))
    raise AssertionError("unreachable")


def download(remote: Remote, dest: Path, retries: int = 4, retry_wait: float = 2.0, timeout: float = 60.0,
             echo: Callable[[str], None] = print) -> Path:
    """Download ``remote`` to ``dest`` (resuming ``dest.part``), verify it, and return ``dest``.

    A ``dest`` that already exists is kept (after a checksum check when the hash is known). Each URL
    gets ``retries`` resumed retries after a dropped connection, a network error or a 5xx status,
    ``retry_wait`` seconds apart (times the attempt number); a 4xx status moves on to the next URL.

    Raises:
        DownloadError: every URL failed, or the file has the wrong size or checksum (the partial
            file is removed so the next attempt starts clean).
    """
    dest = Path(dest)
    if dest.exists():
        if remote.sha256 is not None and sha256_file(dest) != remote.sha256:
            raise DownloadError(f"{dest} exists but its sha256 differs from the known {remote.name}; "
                                "delete it and fetch again")
        echo(f"{remote.name}: already present at {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start, start_size = time.monotonic(), part.stat().st_size if part.exists() else 0
    failures: list[str] = []
    for url in remote.urls:
        try:
            total = _fetch_with_retries(url, part, remote.name, retries, retry_wait, timeout)
            break
        except _Failed as e:
            failures.append(f"{url}: {e}")
    else:
        raise DownloadError(f"could not download {remote.name} ({'; '.join(failures)})")
    _verify(remote, part, dest, total, echo)
    os.replace(part, dest)
    elapsed, got = time.monotonic() - start, dest.stat().st_size - start_size
    echo(f"{remote.name}: {_human(dest.stat().st_size)} at {dest} ({_human(got)} in {elapsed:.0f} s, "
         f"{_human(got / max(elapsed, 1e-9))}/s)")
    return dest


def _verify(remote: Remote, part: Path, dest: Path, server_total: int | None,
            echo: Callable[[str], None]) -> None:
    """Check ``part`` against the known size and hash (removing it on a mismatch), or record its hash."""
    size = part.stat().st_size
    expected = remote.size if remote.size is not None else server_total
    if expected is not None and size != expected:
        part.unlink()
        raise DownloadError(f"{remote.name} is {size} bytes but {expected} were expected; "
                            "the partial file was removed, fetch again")
    digest = sha256_file(part)
    if remote.sha256 is not None:
        if digest != remote.sha256:
            part.unlink()
            raise DownloadError(f"{remote.name} has sha256 {digest}, not the known {remote.sha256}, so it was "
                                "refused and the partial file removed")
        return
    record = dest.with_name(dest.name + ".sha256")
    record.write_text(f"{digest}  {remote.name}\n")
    echo(f"{remote.name}: sha256 {digest} (no published hash to compare with; recorded in {record})")
