"""The bulk engine: one rank's share of a manifest, given a predictor and its rank and world, ->
result lines in manifest order, then (all ranks done) the folder's ``results.jsonl``.

:func:`run_manifest` opens the folder's store (rank 0 checks or writes ``run.json`` first), takes
rows ``rank, rank + world, ...``, and runs them: DataLoader workers read, hash, decode and
preprocess images (:class:`_Images`; an image whose every pair the folder already answers is
hashed, not decoded); (image, expression) pairs of several images are packed into batches of up to
``batch_size`` pairs; ``lanes`` batches run in the model at once, each in its own thread with an
equal share of torch's threads (restored after the run), and their outputs are taken in the order
they started; each image is post-processed at its displayed size and its lines (and, with
``save_png``, mask and overlay PNGs) are written as soon as it and the images before it are done.
The engine reads no launcher environment: ``rank`` and ``world`` are its arguments, and it uses
the process group only when ``world`` > 1.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sharedris.bulk.manifest import BadRow, Manifest, Row
from sharedris.bulk.store import (ERRORS, RESULTS, Entry, JsonlWriter, Line, finish_results, merge_errors,
                                  open_folder, pair_key, rank_file, recover)
from sharedris.data.images import ImageError, load_image
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.predictor import ImagePreprocessor, Prediction, Predictor
from sharedris.progress import progress
from sharedris.render import answer_record, png_names, save_pngs


@dataclass(frozen=True)
class BulkSummary:
    """What a bulk run did, over all ranks. In pairs: ``written``, new to the folder and predicted
    now; ``reused`` from an earlier run (same image bytes, expression, model and settings);
    ``recomputed``, predicted again because the folder's line for that id and text index answered
    another image or expression. In rows: ``failed`` (listed in ``errors``). ``unknown_words``: the
    words of the expressions in ``results`` that the model does not know (first seen first; empty
    for an open vocabulary)."""

    written: int
    reused: int
    recomputed: int
    failed: int
    results: Path
    errors: Path
    unknown_words: tuple[str, ...] = ()


class _Images(Dataset):
    """Images read, hashed, decoded and preprocessed in DataLoader workers: ``(index, array (3, S, S),
    (H, W), SHA-256 of the file's bytes)``; ``(index, None, reason, None)`` for an image that cannot
    be read; ``(index, None, None, SHA-256)`` when the file still has the hash ``expected`` gives for
    that index (every pair of the image is reused, so it is not decoded).

    Arrays, not tensors: a worker's tensor reaches the main process through a shared-memory file
    whose descriptor is handed over on a fresh authenticated connection, which cost the main thread
    2.7 ms per image in a profile (decoding and resizing the image there: 3.2 ms); an array is
    copied through the worker's pipe (kept as is by :func:`_as_is`).
    """

    def __init__(self, paths: Sequence[Path], preprocess: ImagePreprocessor, expected: Mapping[int, str]) -> None:
        self.paths, self.preprocess, self.expected = list(paths), preprocess, dict(expected)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[int, int] | str | None, str | None]:
        path = self.paths[i]
        try:
            data = path.read_bytes()  # hashed and decoded: the file is read once
        except FileNotFoundError:
            return i, None, f"image {path} does not exist", None
        except OSError as e:  # e.g. a folder, or no permission to read it
            return i, None, f"image {path} cannot be read ({(e.strerror or str(e)).lower()})", None
        sha256 = hashlib.sha256(data).hexdigest()
        if self.expected.get(i) == sha256:
            return i, None, None, sha256
        try:
            x, size = self.preprocess(load_image(data, name=str(path)))
        except ImageError as e:
            return i, None, str(e), None
        return i, x.numpy(), size, sha256


def _as_is(item: Any) -> Any:
    """The DataLoader's collate step for :class:`_Images`: none (its default turns arrays into tensors)."""
    return item


@dataclass
class _Job:
    """The pairs of one row still to predict, and the model outputs gathered for them so far."""

    row: Row
    pending: list[int] = field(default_factory=list)  # text indices
    sha256: str = ""  # of the image file's bytes
    image: Tensor | None = None  # (3, S, S)
    size: tuple[int, int] = (0, 0)
    ids: Tensor | None = None  # (P, L)
    pad: Tensor | None = None  # (P, L)
    outputs: list[SegmenterOutput] = field(default_factory=list)
    done: int = 0  # pairs whose outputs are in


Plan = tuple[Union[str, None], list[list[Union[Line, None]]]]  # an image's hash, and per row and pair its line


class _Run:
    """One rank's work: jobs -> reused lines, or batches of pairs -> the model -> result lines in order.

    ``earlier``: the lines already in the folder (all made with the run's model and settings).
    """

    def __init__(self, predictor: Predictor, out_dir: Path, results: JsonlWriter, errors: JsonlWriter,
                 batch_size: int, save_png: bool, bar: Any, lanes: int, earlier: Sequence[Line]) -> None:
        self.predictor, self.out_dir, self.results, self.errors = predictor, out_dir, results, errors
        self.batch_size, self.save_png, self.bar, self.lanes = batch_size, save_png, bar, lanes
        self.done = {line.key: line for line in earlier if line.key is not None}
        self.latest = {line.image: line.sha256 for line in earlier if line.sha256 is not None}
        self.positions = {(str(line.id), line.k) for line in earlier}  # pairs a line was written for
        self.entries: list[Entry] = []  # the line of every pair done, reused or predicted
        self.queue: deque[tuple[_Job, int]] = deque()  # pairs waiting for the model: (job, position in pending)
        self.open: deque[_Job] = deque()  # jobs with outputs still missing, in manifest order
        # batches in the model, oldest first: their outputs are taken in this order, so lines stay in order
        self.running: deque[tuple[list[tuple[_Job, int]], Future[SegmenterOutput]]] = deque()
        self.written = self.reused = self.recomputed = self.failed = 0

    def fail(self, row: Row | BadRow, reason: str | None = None) -> None:
        bad = row if isinstance(row, BadRow) else BadRow(row.line, reason or "", row.id, row.image)
        self.errors.write(bad.record())
        self.failed += 1

    def unknown_words(self, rows: Iterable[Row]) -> list[str]:
        """The unknown words of the pairs done, in manifest order: the same whether a pair was reused or predicted."""
        texts = {(r.line, k): t for r in rows for k, t in enumerate(r.texts)}
        words = (self.predictor.unknown_words(texts[e.line, e.k]) for e in sorted(self.entries))
        return list(dict.fromkeys(w for pair in words for w in pair))

    def _png_paths(self, row: Row, k: int) -> tuple[Path, Path]:
        """Where pair ``k`` of ``row`` has its mask and overlay PNGs."""
        mask, overlay_png = png_names(str(row.id), row.texts)[k]
        return self.out_dir / mask, self.out_dir / overlay_png

    def _reusable(self, row: Row, k: int, sha256: str | None) -> Line | None:
        """The line that answers pair ``k`` of ``row`` if its image has ``sha256``; with ``save_png``
        only one whose PNGs have the names this pair's have and are there."""
        line = None if sha256 is None else self.done.get(pair_key(row.image, sha256, row.texts[k]))
        if line is None or not self.save_png:
            return line
        mask, overlay_path = (str(p) for p in self._png_paths(row, k))
        if line.pngs is None or line.pngs[0] not in (None, mask) or line.pngs[1] != overlay_path:
            return None
        return line if all(Path(p).is_file() for p in line.pngs if p is not None) else None

    def _lines(self, group: list[_Job], sha256: str | None) -> list[list[Line | None]]:
        return [[self._reusable(job.row, k, sha256) for k in range(len(job.row.texts))] for job in group]

    def _plan(self, group: list[_Job]) -> Plan:
        sha256 = self.latest.get(group[0].row.image)
        return sha256, self._lines(group, sha256)

    def run(self, jobs: Sequence[_Job], workers: int) -> None:
        # consecutive rows of the same image (a CSV with several expressions per image) decode it once
        groups = [list(g) for _, g in groupby(jobs, key=lambda j: j.row.path)]
        # per image, the lines its last known hash answers; an image whose pairs they all answer is not decoded
        plans = [self._plan(g) for g in groups]
        expected = {i: sha for i, (sha, lines) in enumerate(plans)
                    if sha is not None and all(line is not None for row in lines for line in row)}
        loader = DataLoader(_Images([g[0].row.path for g in groups], self.predictor.preprocess_image, expected),
                            batch_size=None, num_workers=workers, collate_fn=_as_is)
        if self.lanes == 1:
            self._run(groups, plans, loader, None)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // self.lanes))  # the lanes share the model's threads
        try:
            with ThreadPoolExecutor(self.lanes, thread_name_prefix="sharedris-lane") as pool:
                self._run(groups, plans, loader, pool)
        finally:
            torch.set_num_threads(threads)

    def _run(self, groups: list[list[_Job]], plans: list[Plan], loader: DataLoader,
             pool: ThreadPoolExecutor | None) -> None:
        for i, image, info, sha256 in loader:
            if sha256 is None:
                for job in groups[i]:
                    self.fail(job.row, str(info))
                    self.bar.total -= len(job.row.texts)  # the bar counts the pairs that get a line
                continue
            planned, lines = plans[i]
            for job, row_lines in zip(groups[i], lines if sha256 == planned else self._lines(groups[i], sha256)):
                self._take(job, row_lines, sha256, image, info)
            while len(self.queue) >= self.batch_size:
                self._forward(self.batch_size, pool)
        while self.queue:
            self._forward(min(self.batch_size, len(self.queue)), pool)
        while self.running:
            self._collect()

    def _take(self, job: _Job, lines: list[Line | None], sha256: str, image: np.ndarray | None,
              size: tuple[int, int]) -> None:
        """Reuse the pairs of ``job`` that ``lines`` answer; queue the others for the model."""
        job.sha256 = sha256
        for k, line in enumerate(lines):
            if line is None:
                job.pending.append(k)
                continue
            same = (type(line.id), line.id, line.k) == (type(job.row.id), job.row.id, k)
            self.entries.append(Entry(job.row.line, k, line.source, line.offset, line.length,
                                       same and (self.save_png or line.pngs is None)))
            self.reused += 1
        self._progress(len(lines) - len(job.pending))
        if job.pending:
            job.image, job.size = torch.from_numpy(image), size
            job.ids, job.pad = self.predictor.prepare_texts([job.row.texts[k] for k in job.pending])
            self.open.append(job)
            self.queue.extend((job, n) for n in range(len(job.pending)))

    def _progress(self, pairs: int) -> None:
        self.bar.set_postfix(new=self.written, reused=self.reused, recomputed=self.recomputed, refresh=False)
        self.bar.update(pairs)

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
        output = SegmenterOutput(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*job.outputs)))
        pred = self.predictor.postprocess(output, *job.size, texts=[job.row.texts[k] for k in job.pending])
        image = load_image(job.row.path) if self.save_png else None
        for n, k in enumerate(job.pending):
            record = _record(job.row, k, job.sha256, pred, n)
            if image is not None:  # PNGs first: a line in results.jsonl means its files are complete
                record.update(self._pngs(job.row, k, image, pred, n))
            offset, length = self.results.write(record)
            self.entries.append(Entry(job.row.line, k, self.results.name, offset, length, True))
            if (str(job.row.id), k) in self.positions:
                self.recomputed += 1
            else:
                self.written += 1
        self._progress(len(job.pending))
        job.image = job.ids = job.pad = None
        job.outputs = []

    def _pngs(self, row: Row, k: int, image: Image.Image, pred: Prediction, n: int) -> dict[str, str | None]:
        """The mask and overlay PNGs of pair ``k`` of ``row`` (``n`` in ``pred``); no mask PNG for "no match"."""
        return save_pngs(image, pred, n, row.texts[k], *self._png_paths(row, k))


def _record(row: Row, k: int, sha256: str, pred: Prediction, n: int) -> dict[str, Any]:
    """Pair ``k`` of ``row``, whose image file has ``sha256``, as a results line; ``n`` is its index in ``pred``."""
    height, width = pred.masks.shape[1:]
    return {"id": row.id, "text_index": k, "image": row.image, "image_sha256": sha256, "height": int(height),
            "width": int(width), **answer_record(row.texts[k], pred, n)}


def default_lanes(device: torch.device) -> int:
    """Batches in the model at once: 2 on a CPU where torch runs 2 threads or more, else 1.

    A small model's operators leave threads idle: on a 2-core CPU the engine with two batches of
    the default model at once wrote 1.3-1.6x as many pairs per second as with one batch on both
    threads under PyTorch, and 1.09-1.14x under OpenVINO, the main thread's decoding fitting in
    between (docs/benchmarks.md). A GPU runs one batch at a time.
    """
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


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


def _on_rank_0(work: Callable[[], None], rank: int, world: int) -> None:
    """``work()`` on rank 0 while the other ranks wait; what it raises is raised on every rank."""
    error: Exception | None = None
    if rank == 0:
        try:
            work()
        except Exception as e:  # passed on, so that no rank waits for the others forever
            error = e
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def run_manifest(predictor: Predictor, settings: Mapping[str, Any], manifest: Manifest, out: Path, *, rank: int,
                 world: int, batch_size: int, workers: int, lanes: int, save_png: bool, show_progress: bool,
                 fresh: bool) -> BulkSummary:
    """Rank ``rank`` of ``world``'s share of ``manifest`` into the folder ``out`` (created), with
    ``predictor``, whose :func:`~sharedris.bulk.store.run_settings` are ``settings``.

    With ``world`` > 1 every rank calls this in the same process group; rank 0 checks (or, with
    ``fresh``, resets) the folder's run.json before any rank reads it, and once every rank is done
    writes results.jsonl and errors.jsonl. Arguments as for :func:`~sharedris.bulk.predict_manifest`,
    already checked and resolved.

    Returns:
        The counts of all ranks.
    Raises:
        ResultsMismatch: on every rank, when the folder holds results of another model or other settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    _on_rank_0(lambda: open_folder(out, settings, fresh), rank, world)
    results_path = out / rank_file(RESULTS, rank, world)
    earlier = recover(out / RESULTS) + (recover(results_path) if world > 1 else [])
    mine = manifest.rows[rank::world]
    jobs = [_Job(row) for row in mine if isinstance(row, Row)]
    results = JsonlWriter(results_path, "a")
    errors = JsonlWriter(out / rank_file(ERRORS, rank, world), "w")
    bar = progress(total=sum(len(job.row.texts) for job in jobs), desc="pairs", unit="pair",
                   disable=not show_progress or rank != 0)
    run = _Run(predictor, out, results, errors, batch_size, save_png, bar, lanes, earlier)
    try:
        for row in mine:
            if isinstance(row, BadRow):
                run.fail(row)
        run.run(jobs, workers)
    finally:
        bar.close()
        results.close()
        errors.close()
    return _finish(run, out, manifest, [job.row for job in jobs], rank, world)


def _finish(run: _Run, out: Path, manifest: Manifest, rows: list[Row], rank: int, world: int) -> BulkSummary:
    """Once every rank is done: results.jsonl and errors.jsonl written (by rank 0), the counts of all ranks."""
    counts = torch.tensor([run.written, run.reused, run.recomputed, run.failed], device=run.predictor.device)
    mine = run.unknown_words(rows)
    words: list[Any] = [mine]
    entries: list[Any] | None = [run.entries]
    if world > 1:
        dist.barrier()  # every part is complete
        dist.all_reduce(counts)
        words = [None] * world
        entries = [None] * world if rank == 0 else None  # gathered on rank 0 only
        dist.all_gather_object(words, mine)
        dist.gather_object(run.entries, entries, dst=0)
    if rank == 0:
        finish_results(out, manifest, [e for part in entries for e in part], run.save_png)
        merge_errors(out, [out / rank_file(ERRORS, r, world) for r in range(world)])
    if world > 1:
        dist.barrier()  # results.jsonl is whole for every rank on return
    written, reused, recomputed, failed = (int(c) for c in counts.tolist())
    return BulkSummary(written, reused, recomputed, failed, out / RESULTS, out / ERRORS,
                       tuple(dict.fromkeys(w for part in words for w in part)))
