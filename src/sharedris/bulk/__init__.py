"""Bulk prediction: a manifest of (image, expressions) rows -> ``results.jsonl``, rerunnable, on any number of ranks.

The engine behind ``sharedris predict --manifest`` (and several images, a folder or a glob) and
:func:`predict_manifest`:

* **Input.** JSON Lines (``{"image": ..., "texts": [...], "id": ...}`` per line) or CSV
  (``image,text[,id]``, one pair per row); relative image paths are relative to the manifest's
  folder. Each row is checked on its own: a bad row is reported, never fatal.
* **Throughput.** DataLoader workers read, hash, decode and preprocess images with the picklable
  :class:`~sharedris.predictor.ImagePreprocessor`; (image, expression) pairs of several images are
  packed into one forward pass of up to ``batch_size`` pairs; ``lanes`` batches run in the model at
  once, each in its own thread, and their outputs are taken in the order they started; each image
  is post-processed with :meth:`~sharedris.predictor.Predictor.postprocess` at its displayed size.
* **Output.** One JSON line per pair. A line predicted now is appended and flushed as soon as it
  and the lines before it are done, so a reader can follow the file as it grows; bad rows go to
  ``errors.jsonl``. When the run ends, ``results.jsonl`` holds exactly the lines a fresh run with
  the same inputs writes, in manifest order.
* **Reruns.** A pair is already done when the folder holds a line for the same image (the path as
  written and the SHA-256 of the file's bytes, ``image_sha256``) and the same expression, and the
  folder's ``run.json`` names the same model and settings (:func:`run_settings`: a SHA-256 of the
  model's config, tokenizer, vocabulary and weights as they run, the precision, the runtime and the
  presence threshold), written once per folder because every line in it shares them. Such a line
  is reused, with the pair's own ``id`` and ``text_index``; every other pair is predicted. Lines
  no pair uses any more (their image or expression changed, or the manifest no longer has them)
  are moved to ``replaced.jsonl``, never silently dropped. A folder whose ``run.json`` names
  another model or other settings is refused (:class:`ResultsMismatch`) unless ``fresh`` discards
  its results.

  Why a hash of the bytes, not size and modification time: those miss a file rewritten within the
  clock's resolution or copied with its times kept (``cp -p``, ``rsync -t``), while hashing costs
  little next to decoding (on a 2-core CPU a 640x480 PNG hashed in 1.3 ms and decoded in 20 ms, a
  JPEG 0.07 ms against 1.4 ms). The worker hashes the very bytes it decodes, so no second read
  and no window in which the file could change between the two; it skips decoding an image whose
  every pair is reused.
* **Crash safety.** Lines are written whole and flushed one by one, so a kill can leave at most a
  torn last line; it is cut off before anything is appended. At the end the dropped lines are
  appended to ``replaced.jsonl`` first, then ``results.jsonl`` is written to a temporary file and
  renamed over the old one (not at all when it already is what a fresh run writes).
* **Ranks.** Under torchrun rank 0 checks (or writes) ``run.json`` before any rank reads the
  folder; rank ``r`` of ``N`` takes rows ``r, r + N, ...``, reuses lines of ``results.jsonl`` and
  of its own part ``results.rank{r}.jsonl``, appends what it predicts to that part, and once every
  rank is done rank 0 writes ``results.jsonl`` from every rank's lines in manifest order.

In three modules: :mod:`~sharedris.bulk.manifest` reads manifests (and lists of images) into
checked rows; :mod:`~sharedris.bulk.store` keeps the output folder (appending and recovering
lines, ``run.json``, ``replaced.jsonl``, the merge of rank parts); :mod:`~sharedris.bulk.engine`
runs one rank's rows through a predictor, given its rank and world. :func:`predict_manifest`, here,
checks the arguments, builds the predictor, resolves this process's rank and world
(:mod:`sharedris.distributed`) and hands them to the engine.

docs/bulk.md describes the formats and the rerun behaviour for users.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sharedris.bulk.engine import BulkSummary, default_lanes, default_workers, run_manifest
from sharedris.bulk.manifest import (BadRow, Manifest, ManifestError, ManifestInput, Row, image_rows, is_single_image,
                                     read_manifest)
from sharedris.bulk.store import ResultsMismatch, run_settings
from sharedris.distributed import init_distributed, rank_world
from sharedris.predictor import Predictor
from sharedris.runtime import DEFAULT_DEVICE, DEFAULT_PRECISION, DEFAULT_PRESENCE_THRESHOLD, DEFAULT_RUNTIME

__all__ = ["BadRow", "BulkSummary", "Manifest", "ManifestError", "ManifestInput", "ResultsMismatch", "Row",
           "default_lanes", "default_workers", "image_rows", "is_single_image", "predict_manifest", "rank_device",
           "read_manifest", "run_settings"]


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


def _predictor(model: nn.Module | Predictor, device: torch.device | str, precision: str, presence_threshold: float,
               runtime: str) -> tuple[Predictor, dict[str, Any]]:
    """The predictor to run (``model``, or one built from it on this rank's device) and its :func:`run_settings`."""
    if isinstance(model, Predictor):
        if _world_size() > 1 and not dist.is_initialized():
            init_distributed(model.device.type)
        return model, run_settings(model)
    predictor = Predictor(model, device=rank_device(device), precision=precision,
                          presence_threshold=presence_threshold, runtime=runtime)
    return predictor, run_settings(predictor)


def predict_manifest(model: nn.Module | Predictor, manifest: ManifestInput, out_dir: str | Path, *,
                     device: torch.device | str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
                     presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD, runtime: str = DEFAULT_RUNTIME,
                     batch_size: int = 16, workers: int | None = None,
                     lanes: int | None = None, save_png: bool = False, show_progress: bool = True,
                     fresh: bool = False) -> BulkSummary:
    """Segment every (image, expression) pair of ``manifest`` into ``out_dir/results.jsonl``.

    Each results line is ``{"id", "text_index", "image", "image_sha256", "height", "width"}`` (the
    SHA-256 of the image file's bytes, its displayed size) followed by the answer record of
    :func:`sharedris.render.answer_record` (text, matched, present, score, COCO RLE, bbox, unknown
    words; the mask empty and the box null where ``matched`` is false); bad rows go to
    ``out_dir/errors.jsonl`` as ``{"line", "id", "image", "reason"}``. ``out_dir/run.json`` holds
    the model and settings (:func:`run_settings`). A rerun reuses every pair the folder already
    answers (same image path and bytes, same expression) and predicts the others; afterwards
    ``results.jsonl`` is exactly what a fresh run writes, and its lines that no pair uses went to
    ``replaced.jsonl``. ``errors.jsonl`` is rewritten by every run and lists the rows that failed
    in it. Under torchrun every rank calls this; see the module docstring.

    Args:
        model: a Shared-RIS model, or a :class:`~sharedris.predictor.Predictor` (then ``device``,
            ``precision``, ``presence_threshold`` and ``runtime`` are its own).
        manifest: a JSON Lines or CSV file, row mappings, or a :class:`Manifest`
            (see :func:`read_manifest`).
        out_dir: the output folder (created).
        device, precision, presence_threshold, runtime: as for :class:`~sharedris.predictor.Predictor`.
        batch_size: pairs per forward pass, from several images.
        workers: DataLoader worker processes reading and decoding images (0 = in this process);
            None = :func:`default_workers` for the predictor's device.
        lanes: batches in the model at once, each in its own thread with an equal share of torch's
            threads (under OpenVINO, each call uses the threads its compiled model was given), while
            this thread decodes the next images and writes results in order; None =
            :func:`default_lanes` for the predictor's device. Torch's thread count is process-wide:
            with 2 or more lanes it is divided for the run and restored after.
        save_png: also write each pair's mask PNG (not for "no match") and overlay PNG, named by
            :func:`sharedris.render.png_names` from the row's id and the expression.
        show_progress: a progress bar of the pairs on stderr (rank 0 only).
        fresh: first delete the folder's earlier results (results.jsonl, replaced.jsonl, run.json).
    Returns:
        The counts of all ranks: pairs new, reused and recomputed, rows failed.
    Raises:
        ManifestError: the manifest cannot be read at all.
        ResultsMismatch: the folder holds results of another model or other settings (and not ``fresh``).
        ValueError: ``batch_size`` or ``lanes`` below 1, or ``workers`` below 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    if lanes is not None and lanes < 1:
        raise ValueError(f"lanes must be 1 or more, got {lanes}")
    manifest = read_manifest(manifest)
    predictor, settings = _predictor(model, device, precision, presence_threshold, runtime)
    workers = default_workers(predictor.device) if workers is None else workers
    lanes = default_lanes(predictor.device) if lanes is None else lanes
    rank, world = rank_world()
    return run_manifest(predictor, settings, manifest, Path(out_dir), rank=rank, world=world, batch_size=batch_size,
                        workers=workers, lanes=lanes, save_png=save_png, show_progress=show_progress, fresh=fresh)
