"""Bulk prediction: a manifest of (image, expressions) rows -> ``results.jsonl``, resumable, on any number of ranks.

The engine behind ``sharedris predict --manifest`` (and several images, a folder or a glob) and
:func:`predict_manifest`:

* **Input.** JSON Lines (``{"image": ..., "texts": [...], "id": ...}`` per line) or CSV
  (``image,text[,id]``, one pair per row); relative image paths are relative to the manifest's
  folder. Each row is checked on its own: a bad row is reported, never fatal.
* **Throughput.** DataLoader workers decode and preprocess images with the picklable
  :class:`~sharedris.predictor.ImagePreprocessor`; (image, expression) pairs of several images are
  packed into one forward pass of up to ``batch_size`` pairs; ``lanes`` batches run in the model at
  once, each in its own thread, and their outputs are taken in the order they started; each image
  is post-processed with :meth:`~sharedris.predictor.Predictor.postprocess` at its displayed size.
* **Output.** One JSON line per pair, appended and flushed in manifest order, so a reader can
  follow the file as it grows; bad rows go to ``errors.jsonl``.
* **Resume.** A rerun reads the pairs already in the results file and skips them. Lines are
  written whole and flushed one by one, so a kill can leave at most a torn last line; it is cut
  off before anything is appended.
* **Ranks.** Under torchrun rank ``r`` of ``N`` takes rows ``r, r + N, ...``, writes
  ``results.rank{r}.jsonl``, and rank 0 merges the parts into ``results.jsonl`` in manifest
  order once every rank is done.

docs/bulk.md describes the formats and the rerun behaviour for users.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sharedris.checkpoint import atomic_write
from sharedris.data.images import ImageError, load_image
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.predictor import ImagePreprocessor, Prediction, Predictor
from sharedris.progress import progress
from sharedris.render import encode_rle, overlay
from sharedris.text import validate_texts
from sharedris.train.distributed import init_distributed

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing file, unknown format, a CSV header without a needed column)."""


@dataclass(frozen=True)
class Row:
    """A valid manifest row.

    line: its line number in the manifest (1-based; for a list of images, the image's position).
    id: the row's ``id``, or ``line`` when it has none.
    image: the image path as written; ``path``: resolved against the manifest's folder.
    texts: its expressions, all non-empty.
    """

    line: int
    id: str | int
    image: str
    path: Path
    texts: tuple[str, ...]


@dataclass(frozen=True)
class BadRow:
    """A manifest row that cannot be predicted; ``reason`` is one sentence."""

    line: int
    reason: str
    id: str | int | None = None
    image: str | None = None

    def record(self) -> dict[str, Any]:
        """The row's line in ``errors.jsonl``."""
        out: dict[str, Any] = {"line": self.line}
        if self.id is not None:
            out["id"] = self.id
        if self.image is not None:
            out["image"] = self.image
        out["reason"] = self.reason
        return out


@dataclass(frozen=True)
class Manifest:
    """Every row of a manifest in order, valid (:class:`Row`) or not (:class:`BadRow`)."""

    rows: tuple[Row | BadRow, ...]
    name: str

    @property
    def pairs(self) -> int:
        """The number of (image, expression) pairs of the valid rows."""
        return sum(len(r.texts) for r in self.rows if isinstance(r, Row))


ManifestInput = Union[str, Path, Iterable[Mapping[str, Any]], Manifest]


@dataclass(frozen=True)
class BulkSummary:
    """What a bulk run did, over all ranks: pairs written now, pairs skipped because an earlier run
    wrote them, rows that failed (listed in ``errors``), and the words of the expressions written
    now that the model does not know (first seen first; empty for an open vocabulary)."""

    written: int
    skipped: int
    failed: int
    results: Path
    errors: Path
    unknown_words: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ manifests
def read_manifest(manifest: ManifestInput) -> Manifest:
    """Read and check every row of ``manifest``; a bad row becomes a :class:`BadRow`, never an exception.

    Args:
        manifest: a ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON Lines) or ``.csv`` file; an iterable
            of row mappings (``{"image", "texts", "id"}``, paths relative to the working folder);
            or a :class:`Manifest` (returned as is).
    Raises:
        ManifestError: the file is missing, of another format, or a CSV without an image or text column.
    """
    if isinstance(manifest, Manifest):
        return manifest
    if isinstance(manifest, (str, Path)):
        path = Path(manifest)
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist" if not path.exists()
                                else f"manifest {path} is not a file")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            entries: Iterable[tuple[int, Any]] = _csv_entries(path)
        elif suffix in JSONL_SUFFIXES:
            entries = _jsonl_entries(path)
        else:
            raise ManifestError(f"manifest {path} has an unknown format; name it .jsonl (JSON Lines) or .csv")
        base, name = path.parent, str(path)
    else:
        entries, base, name = enumerate(manifest, start=1), Path(), "rows"
    rows: list[Row | BadRow] = []
    seen: dict[str, int] = {}  # id -> line of its first row
    for line, entry in entries:
        row = entry if isinstance(entry, BadRow) else _check_row(line, entry, base)
        if isinstance(row, Row):
            first = seen.setdefault(str(row.id), line)
            if first != line:
                row = BadRow(line, f"id {row.id!r} is already used by line {first}; ids must be unique",
                             row.id, row.image)
        rows.append(row)
    return Manifest(tuple(rows), name)


def _jsonl_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or BadRow) per non-blank line of a JSON Lines file."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield line, BadRow(line, "the line is not UTF-8 text")
            except json.JSONDecodeError as e:
                yield line, BadRow(line, f"the line is not valid JSON ({e.msg} at column {e.colno})")


def _csv_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row mapping or BadRow) per record of a CSV file with header ``image,text[,id]``."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often write a BOM
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in ("image", "text") if c not in header]
            if missing:
                raise ManifestError(f"manifest {path} has no {missing[0]!r} column; its header must be "
                                    "image,text or image,text,id")
            start = reader.line_num + 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not any(v.strip() for v in record):
                    continue
                # trailing optional columns (id) may be left out
                needed = max(header.index("image"), header.index("text")) + 1
                if not needed <= len(record) <= len(header):
                    yield line, BadRow(line, f"the row has {len(record)} field(s) but the header has {len(header)}")
                    continue
                values = dict(zip(header, record))
                yield line, {"image": values["image"], "texts": [values["text"]], "id": values.get("id") or None}
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {path} is not UTF-8 text") from None


def _check_row(line: int, obj: Any, base: Path) -> Row | BadRow:
    if not isinstance(obj, Mapping):
        return BadRow(line, f'expected an object with "image" and "texts", got a JSON {type(obj).__name__}')
    row_id, image, texts = obj.get("id"), obj.get("image"), obj.get("texts")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        return BadRow(line, f'"id" must be a string or an integer, got {row_id!r}')
    row_id = line if row_id is None else row_id
    if not isinstance(image, (str, Path)) or not str(image).strip():
        return BadRow(line, 'the row has no "image" path', row_id)
    image = str(image)
    if texts is None:
        return BadRow(line, 'the row has no "texts" list of expressions', row_id, image)
    try:
        texts = validate_texts(texts)
    except (TypeError, ValueError) as e:
        return BadRow(line, str(e), row_id, image)
    path = Path(image).expanduser()
    return Row(line, row_id, image, path if path.is_absolute() else base / path, tuple(texts))


def image_rows(images: Sequence[str], texts: Sequence[str]) -> list[dict[str, Any]]:
    """Manifest rows for image files, folders (their image files, sorted) and glob patterns, each
    with the same ``texts``.

    Raises:
        ValueError: an empty or blank expression.
        ManifestError: a folder without image files, or a pattern that matches nothing.
    """
    texts = validate_texts(list(texts))
    Image.init()
    suffixes = set(Image.registered_extensions())
    paths: list[str] = []
    for item in images:
        if Path(item).is_dir():
            found = sorted(str(p) for p in Path(item).iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise ManifestError(f"{item} is a directory with no image files in it; give image files, "
                                    "a folder of images or a glob pattern")
            paths += found
        elif glob.has_magic(item) and not Path(item).exists():
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise ManifestError(f"the pattern {item!r} matches no file")
            paths += found
        else:
            paths.append(item)  # a missing file is a bad row, reported like any other
    return [{"image": p, "texts": texts} for p in paths]


def is_single_image(images: Sequence[str]) -> bool:
    """True when ``images`` is one plain path (not a folder, not a glob pattern): the one-image mode."""
    return (len(images) == 1 and not Path(images[0]).is_dir()
            and (Path(images[0]).exists() or not glob.has_magic(images[0])))


# --------------------------------------------------------------------------------- result files
def _key(record: Mapping[str, Any]) -> tuple[str, int]:
    return str(record["id"]), int(record["text_index"])


def _scan(path: Path) -> tuple[list[tuple[tuple[str, int], int, int]], int]:
    """The whole lines of a results file: ``[(key, offset, length)]``, and where the last one ends.

    Reading stops at the first line that is torn (no newline) or not a result; everything from
    there on is what a kill left behind.
    """
    lines: list[tuple[tuple[str, int], int, int]] = []
    end = 0
    if not path.exists():
        return lines, end
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                key = _key(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                break
            lines.append((key, end, len(raw)))
            end += len(raw)
    return lines, end


def _recover(path: Path) -> set[tuple[str, int]]:
    """Keys of the pairs in ``path``, after cutting off a torn tail so that appending is safe."""
    lines, end = _scan(path)
    if path.exists() and path.stat().st_size > end:
        with open(path, "r+b") as f:
            f.truncate(end)
    return {key for key, _, _ in lines}


class _JsonlWriter:
    """Whole lines, each flushed at once: a reader (or a kill) sees complete lines plus at most one torn one."""

    def __init__(self, path: Path, mode: str) -> None:
        self.file = open(path, mode + "b")

    def write(self, record: Mapping[str, Any]) -> None:
        self.file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _replace(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``path`` atomically (:func:`~sharedris.checkpoint.atomic_write`), streaming ``chunks``."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    atomic_write(path, write)


def _merge_results(out_dir: Path, manifest: Manifest) -> None:
    """``results.jsonl`` and the rank parts -> ``results.jsonl`` in manifest order, each pair once; parts removed."""
    order = {(str(r.id), k): (i, k) for i, r in enumerate(manifest.rows) if isinstance(r, Row)
             for k in range(len(r.texts))}
    sources = [out_dir / RESULTS] + sorted(out_dir.glob("results.rank*.jsonl"))
    entries = []
    for s, src in enumerate(sources):
        for key, offset, length in _scan(src)[0]:
            # pairs the manifest no longer has keep their place after all of its own
            entries.append((order.get(key, (len(manifest.rows), 0)), s, offset, length, key))
    entries.sort()

    def chunks() -> Iterator[bytes]:
        files = [open(src, "rb") if src.exists() else None for src in sources]
        try:
            seen: set[tuple[str, int]] = set()
            for _, s, offset, length, key in entries:
                if key not in seen:  # a part merged before a kill could repeat what results.jsonl has
                    seen.add(key)
                    files[s].seek(offset)
                    yield files[s].read(length)
        finally:
            for f in files:
                if f is not None:
                    f.close()

    _replace(out_dir / RESULTS, chunks())
    for src in sources[1:]:
        src.unlink()


def _merge_errors(out_dir: Path, sources: Sequence[Path]) -> None:
    """The error lines of ``sources`` -> ``errors.jsonl``, sorted by manifest line; rank parts removed."""
    records = []
    for src in sources:
        with open(src, encoding="utf-8") as f:
            records += [json.loads(line) for line in f if line.endswith("\n")]
    records.sort(key=lambda r: r["line"])
    _replace(out_dir / ERRORS, ((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records))
    for src in sources:
        if src.name != ERRORS:
            src.unlink()


# ----------------------------------------------------------------------------------- the engine
class _Images(Dataset):
    """Decoded, preprocessed images in DataLoader workers: ``(index, array (3, S, S), (H, W))``,
    or ``(index, None, reason)`` for an image that cannot be read.

    Arrays, not tensors: a worker's tensor reaches the main process through a shared-memory file
    whose descriptor is handed over on a fresh authenticated connection, which cost the main thread
    2.7 ms per image in a profile (decoding and resizing the image there: 3.2 ms); an array is
    copied through the worker's pipe (kept as is by :func:`_as_is`).
    """

    def __init__(self, paths: Sequence[Path], preprocess: ImagePreprocessor) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[int, int] | str]:
        try:
            x, size = self.preprocess(self.paths[i])
        except ImageError as e:
            return i, None, str(e)
        except OSError as e:  # e.g. no permission to read it
            return i, None, f"image {self.paths[i]} cannot be read ({(e.strerror or str(e)).lower()})"
        return i, x.numpy(), size


def _as_is(item: Any) -> Any:
    """The DataLoader's collate step for :class:`_Images`: none (its default turns arrays into tensors)."""
    return item


@dataclass
class _Job:
    """The pairs of one row still to predict, and the model outputs gathered for them so far."""

    row: Row
    pending: list[int]  # text indices
    image: Tensor | None = None  # (3, S, S)
    size: tuple[int, int] = (0, 0)
    ids: Tensor | None = None  # (P, L)
    pad: Tensor | None = None  # (P, L)
    outputs: list[SegmenterOutput] = field(default_factory=list)
    done: int = 0  # pairs whose outputs are in


class _Run:
    """One rank's work: jobs -> batches of pairs -> the model -> result lines in order."""

    def __init__(self, predictor: Predictor, out_dir: Path, results: _JsonlWriter, errors: _JsonlWriter,
                 batch_size: int, save_png: bool, bar: Any, lanes: int) -> None:
        self.predictor, self.out_dir, self.results, self.errors = predictor, out_dir, results, errors
        self.batch_size, self.save_png, self.bar, self.lanes = batch_size, save_png, bar, lanes
        self.queue: deque[tuple[_Job, int]] = deque()  # pairs waiting for the model: (job, position in pending)
        self.open: deque[_Job] = deque()  # jobs with outputs still missing, in manifest order
        # batches in the model, oldest first: their outputs are taken in this order, so lines stay in order
        self.running: deque[tuple[list[tuple[_Job, int]], Future[SegmenterOutput]]] = deque()
        self.written = self.failed = 0
        self.unknown: dict[str, None] = {}  # unknown words met, in order

    def fail(self, row: Row | BadRow, reason: str | None = None) -> None:
        bad = row if isinstance(row, BadRow) else BadRow(row.line, reason or "", row.id, row.image)
        self.errors.write(bad.record())
        self.failed += 1

    def run(self, jobs: Sequence[_Job], workers: int) -> None:
        # consecutive rows of the same image (a CSV with several expressions per image) decode it once
        groups = [list(g) for _, g in groupby(jobs, key=lambda j: j.row.path)]
        loader = DataLoader(_Images([g[0].row.path for g in groups], self.predictor.preprocess_image),
                            batch_size=None, num_workers=workers, collate_fn=_as_is)
        if self.lanes == 1:
            self._run(groups, loader, None)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // self.lanes))  # the lanes share the model's threads
        try:
            with ThreadPoolExecutor(self.lanes, thread_name_prefix="sharedris-lane") as pool:
                self._run(groups, loader, pool)
        finally:
            torch.set_num_threads(threads)

    def _run(self, groups: list[list[_Job]], loader: DataLoader, pool: ThreadPoolExecutor | None) -> None:
        for i, image, info in loader:
            if image is None:
                for job in groups[i]:
                    self.fail(job.row, str(info))
                    self.bar.update(len(job.pending))  # done with, if not written
                continue
            for job in groups[i]:
                job.image, job.size = torch.from_numpy(image), info
                job.ids, job.pad = self.predictor.prepare_texts([job.row.texts[k] for k in job.pending])
                self.open.append(job)
                self.queue.extend((job, n) for n in range(len(job.pending)))
            while len(self.queue) >= self.batch_size:
                self._forward(self.batch_size, pool)
        while self.queue:
            self._forward(min(self.batch_size, len(self.queue)), pool)
        while self.running:
            self._collect()

    def _forward(self, n: int, pool: ThreadPoolExecutor | None) -> None:
        """Start the model on the next ``n`` queued pairs in a lane (here without ``pool``); with
        every lane busy, wait for the oldest batch and write every job that is then complete."""
        pairs = [self.queue.popleft() for _ in range(n)]
        batch = (torch.stack([job.image for job, _ in pairs]), torch.stack([job.ids[k] for job, k in pairs]),
                 torch.stack([job.pad[k] for job, k in pairs]))
        if pool is None:
            future: Future[SegmenterOutput] = Future()
            future.set_result(self.predictor.forward(*batch))
        else:
            future = pool.submit(self.predictor.forward, *batch)
        self.running.append((pairs, future))
        while len(self.running) >= self.lanes:
            self._collect()

    def _collect(self) -> None:
        """Wait for the oldest batch in the model, file its outputs, write every job now complete."""
        pairs, future = self.running.popleft()
        output = future.result()
        start = 0
        for job, group in groupby(pairs, key=lambda p: p[0]):
            count = len(list(group))
            job.outputs.append(output.rows(start, start + count))
            job.done += count
            start += count
        while self.open and self.open[0].done == len(self.open[0].pending):
            self._write(self.open.popleft())

    def _write(self, job: _Job) -> None:
        output = SegmenterOutput(*(torch.cat(parts) for parts in zip(*job.outputs)))
        pred = self.predictor.postprocess(output, *job.size, texts=[job.row.texts[k] for k in job.pending])
        image = load_image(job.row.path) if self.save_png else None
        for n, k in enumerate(job.pending):
            record = _record(job.row, k, pred, n)
            self.unknown.update(dict.fromkeys(record["unknown_words"]))
            if image is not None:  # PNGs first: a line in results.jsonl means its files are complete
                record.update(self._pngs(job.row, k, image, pred, n))
            self.results.write(record)
        self.written += len(job.pending)
        self.bar.update(len(job.pending))
        job.image = job.ids = job.pad = None
        job.outputs = []

    def _pngs(self, row: Row, k: int, image: Image.Image, pred: Prediction, n: int) -> dict[str, str | None]:
        """The mask and overlay PNGs of pair ``k`` of ``row`` (``n`` in ``pred``); no mask PNG for "no match"."""
        stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(row.id))
        mask_path = self.out_dir / f"{stem}__{k}_mask.png"
        overlay_path = self.out_dir / f"{stem}__{k}_overlay.png"
        mask, matched = pred.masks[n], bool(pred.matched[n])
        if matched:
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        overlay(image, mask, row.texts[k], score=float(pred.scores[n]), present=float(pred.present[n]),
                matched=matched).save(overlay_path)
        return {"mask_png": str(mask_path) if matched else None, "overlay_png": str(overlay_path)}


def _record(row: Row, k: int, pred: Prediction, n: int) -> dict[str, Any]:
    """Pair ``k`` of ``row`` as a results line; ``n`` is its index in ``pred``."""
    height, width = pred.masks.shape[1:]
    return {"id": row.id, "text_index": k, "image": row.image, "text": row.texts[k],
            "matched": bool(pred.matched[n]), "present": round(float(pred.present[n]), 4),
            "score": round(float(pred.scores[n]), 4), "height": int(height), "width": int(width),
            "rle": encode_rle(pred.masks[n]), "unknown_words": pred.unknown_words[n]}


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: torch.device | str) -> torch.device:
    """The device of this process: ``device`` alone; under torchrun (``WORLD_SIZE`` > 1) join the
    process group (gloo on CPU, nccl on GPU) and run on ``cuda:LOCAL_RANK`` for CUDA.

    Raises:
        ValueError: a numbered GPU under torchrun, where each rank takes its own.
    """
    device = torch.device(device)
    if _world_size() == 1:
        return device
    if device.index is not None:
        raise ValueError(f"under torchrun each rank runs on cuda:LOCAL_RANK; pass --device {device.type}, "
                         f"not {device}")
    return init_distributed(device.type).device


def default_lanes(device: torch.device, runtime: str = "torch") -> int:
    """Batches in the model at once: 2 for PyTorch on a CPU where it runs 2 threads or more, else 1.

    A small model's operators leave threads idle: on a 2-core CPU the engine with two batches of
    the default model at once, one torch thread each, wrote 1.3-1.6x as many pairs per second as
    with one batch on both threads, the main thread's decoding fitting in between
    (docs/benchmarks.md). A GPU runs one batch at a time, and OpenVINO schedules its own threads.
    """
    return 2 if runtime == "torch" and device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def default_workers(device: torch.device) -> int:
    """Image-decoding worker processes worth starting: up to 2, on cores the model does not use.

    On a GPU the model leaves the CPU cores free. On a CPU torch runs its own threads
    (``torch.get_num_threads()``) on the cores; a worker on a core they use slows the model's
    threads more than its decoding saves: on a 2-core machine with 2 torch threads, the engine with
    2 workers wrote fewer pairs per second than decoding in the main process (docs/benchmarks.md).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cores - 1 if device.type == "cuda" else cores - torch.get_num_threads()
    return max(0, min(2, spare))


def predict_manifest(model: nn.Module | Predictor, manifest: ManifestInput, out_dir: str | Path, *,
                     device: torch.device | str = "cpu", precision: str = "fp32", presence_threshold: float = 0.5,
                     batch_size: int = 16, workers: int | None = None, lanes: int | None = None,
                     save_png: bool = False, show_progress: bool = True) -> BulkSummary:
    """Segment every (image, expression) pair of ``manifest`` into ``out_dir/results.jsonl``.

    Each results line is ``{"id", "text_index", "image", "text", "matched", "present", "score",
    "height", "width", "rle", "unknown_words"}`` (COCO RLE at the displayed size, empty where
    ``matched`` is false: the expression matches nothing; the expression's words the model does
    not know); bad rows go to ``out_dir/errors.jsonl`` as
    ``{"line", "id", "image", "reason"}``. Pairs already in ``results.jsonl`` are skipped, so a
    rerun after a crash continues where it stopped; ``errors.jsonl`` is rewritten by every run and
    lists the rows that failed in it. Under torchrun every rank calls this; see the module docstring.

    Args:
        model: a Shared-RIS model, or a :class:`~sharedris.predictor.Predictor` (then ``device``,
            ``precision`` and ``presence_threshold`` are its own).
        manifest: a JSON Lines or CSV file, row mappings, or a :class:`Manifest`
            (see :func:`read_manifest`).
        out_dir: the output folder (created).
        device, precision, presence_threshold: as for :class:`~sharedris.predictor.Predictor`.
        batch_size: pairs per forward pass, from several images.
        workers: DataLoader worker processes decoding images (0 = in this process); None =
            :func:`default_workers` for the predictor's device.
        lanes: batches in the model at once, each in its own thread with an equal share of torch's
            threads, while this thread decodes the next images and writes results in order; None =
            :func:`default_lanes` for the predictor's device. Torch's thread count is process-wide:
            with 2 or more lanes it is divided for the run and restored after.
        save_png: also write ``<id>__<text index>_mask.png`` (not for "no match") and ``_overlay.png`` per pair.
        show_progress: a progress bar on stderr (rank 0 only).
    Returns:
        The counts of all ranks: pairs written, pairs skipped as already done, rows failed.
    Raises:
        ManifestError: the manifest cannot be read at all.
        ValueError: ``batch_size`` or ``lanes`` below 1, or ``workers`` below 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if lanes is not None and lanes < 1:
        raise ValueError(f"lanes must be 1 or more, got {lanes}")
    manifest = read_manifest(manifest)
    if not isinstance(model, Predictor):
        model = Predictor(model, device=rank_device(device), precision=precision,
                          presence_threshold=presence_threshold)
    elif _world_size() > 1 and not dist.is_initialized():
        init_distributed(model.device.type)
    if workers is None:
        workers = default_workers(model.device)
    if lanes is None:
        lanes = default_lanes(model.device, model.runtime)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    errors_path = out / (ERRORS if world == 1 else f"errors.rank{rank}.jsonl")

    done = _recover(results_path) | (_recover(out / RESULTS) if world > 1 else set())
    mine = manifest.rows[rank::world]
    jobs, skipped, total = [], 0, 0
    for row in mine:
        if isinstance(row, Row):
            pending = [k for k in range(len(row.texts)) if (str(row.id), k) not in done]
            skipped += len(row.texts) - len(pending)
            total += len(row.texts)
            if pending:
                jobs.append(_Job(row, pending))

    results, errors = _JsonlWriter(results_path, "a"), _JsonlWriter(errors_path, "w")
    bar = progress(total=total, initial=skipped, desc="pairs", disable=not show_progress or rank != 0)
    run = _Run(model, out, results, errors, batch_size, save_png, bar, lanes)
    try:
        for row in mine:
            if isinstance(row, BadRow):
                run.fail(row)
        run.run(jobs, workers)
    finally:
        bar.close()
        results.close()
        errors.close()

    counts = torch.tensor([run.written, skipped, run.failed], device=model.device)
    unknown = [list(run.unknown)]
    if world > 1:
        dist.barrier()  # every part is complete
        dist.all_reduce(counts)
        unknown = [None] * world
        dist.all_gather_object(unknown, list(run.unknown))
        if rank == 0:
            _merge_results(out, manifest)
            _merge_errors(out, [out / f"errors.rank{r}.jsonl" for r in range(world)])
        dist.barrier()  # results.jsonl is whole for every rank on return
    else:
        _merge_errors(out, [errors_path])
    written, skipped, failed = (int(c) for c in counts.tolist())
    words = tuple(dict.fromkeys(w for part in unknown for w in part))
    return BulkSummary(written, skipped, failed, out / RESULTS, out / ERRORS, words)
