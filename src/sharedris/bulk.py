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

docs/bulk.md describes the formats and the rerun behaviour for users.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sharedris.checkpoint import atomic_write
from sharedris.data.images import ImageError, load_image
from sharedris.distributed import init_distributed
from sharedris.modeling.segmenter import SegmenterOutput
from sharedris.predictor import ImagePreprocessor, Prediction, Predictor
from sharedris.progress import progress
from sharedris.render import answer_record, overlay, png_names
from sharedris.runtime import DEFAULT_DEVICE, DEFAULT_PRECISION, DEFAULT_PRESENCE_THRESHOLD, DEFAULT_RUNTIME
from sharedris.text import validate_texts

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
REPLACED = "replaced.jsonl"
RUN = "run.json"
PARTS = "results.rank*.jsonl"
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


class ResultsMismatch(ValueError):
    """The output folder holds results of another model or other settings; nothing was changed.

    ``differences`` name them (``"precision bf16 (this run: fp32)"``). ``str()`` is one sentence
    naming the ``fresh=True`` keyword; :meth:`sentence` names another way to start afresh (the
    command line's ``--fresh``).
    """

    def __init__(self, folder: str | Path, differences: Sequence[str]) -> None:
        self.folder, self.differences = Path(folder), tuple(differences)
        super().__init__(self.sentence("fresh=True"))

    def sentence(self, fresh: str) -> str:
        return (f"{self.folder} holds results made with {' and '.join(self.differences)}; pass {fresh} to "
                "discard them and start afresh, or write to another folder")

    def __reduce__(self) -> tuple[Any, ...]:  # ranks pass it on
        return type(self), (self.folder, self.differences)


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




# ------------------------------------------------------------------------ model and settings
def run_settings(predictor: Predictor, model: nn.Module | None = None) -> dict[str, Any]:
    """What decides every answer besides the image and the expression, as ``run.json`` stores it.

    ``model_sha256`` covers the model's config, tokenizer file, vocabulary and weights. The weights
    are those that run: on PyTorch the predictor's module (the model at fp32, its bf16 or int8 copy
    otherwise, the same bytes for the same model and precision); an OpenVINO predictor runs a
    compiled model whose weights cannot be read, so there ``model``, the module it was built from,
    is read instead. Then ``precision`` (the concrete one), ``runtime`` and ``presence_threshold``.
    The device, batch size, lanes and threads are left out: like two machines, they change results
    only at the level of floating-point rounding.

    Raises:
        ValueError: an OpenVINO predictor without ``model``.
    """
    module = predictor.runner.module if predictor.runtime == "torch" else model
    if module is None:
        raise ValueError("an OpenVINO Predictor does not expose the weights that identify its results; pass "
                         "the model itself with runtime='openvino'")
    digest = hashlib.sha256()
    vocabulary = None if predictor.vocabulary is None else sorted(predictor.vocabulary)
    digest.update(json.dumps([predictor.config.to_dict(), vocabulary], sort_keys=True).encode())
    digest.update(predictor.tokenizer.model_file.read_bytes())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        _hash_tensor(digest, tensor)
    return {"model_sha256": digest.hexdigest(), "precision": predictor.precision, "runtime": predictor.runtime,
            "presence_threshold": predictor.presence_threshold}


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    """Feed ``tensor``'s dtype, shape and bytes to ``digest``; a tensor subclass (int8 weights) by its inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        for name in tensor.__tensor_flatten__()[0]:
            digest.update(name.encode())
            _hash_tensor(digest, getattr(tensor, name))
        return
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _differences(earlier: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What ``earlier`` settings (a folder's run.json) say that ``now`` does not, in words."""
    named = [(f"{key.replace('_', ' ')} {earlier.get(key)} (this run: {now[key]})")
             for key in ("precision", "runtime", "presence_threshold") if earlier.get(key) != now[key]]
    # weights hashed at another precision or runtime differ anyway: name the model only when those agree
    if not named and earlier.get("model_sha256") != now["model_sha256"]:
        named.append(f"another model (sha256 {str(earlier.get('model_sha256'))[:12]}..., this run: "
                     f"{now['model_sha256'][:12]}...)")
    return named or ["other settings"]


def _open_folder(out: Path, settings: Mapping[str, Any], fresh: bool) -> None:
    """Make ``out`` a folder whose every result line was made with ``settings`` (rank 0, before any rank reads it).

    ``fresh`` first deletes the earlier results (results.jsonl, its rank parts, replaced.jsonl,
    run.json). A folder without a readable run.json (new, or written before run.json existed) gets
    one; result lines already there, of unknown origin, move to replaced.jsonl.

    Raises:
        ResultsMismatch: run.json names another model or other settings.
    """
    run = out / RUN
    if fresh:
        for path in (out / RESULTS, out / REPLACED, run, *out.glob(PARTS)):
            path.unlink(missing_ok=True)
    try:
        earlier = json.loads(run.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict):
        if earlier != dict(settings):
            raise ResultsMismatch(out, _differences(earlier, settings))
        return
    sources = [out / RESULTS, *sorted(out.glob(PARTS))]
    _archive(out, [line for src in sources for line in _recover(src)])
    for src in sources:
        src.unlink(missing_ok=True)
    atomic_write(run, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8"))


# --------------------------------------------------------------------------------- result files
@dataclass(frozen=True, slots=True)
class _Line:
    """A whole line of a results file: where it is, the pair it was written for, and what it answers."""

    source: str  # its file's name in the output folder
    offset: int
    length: int
    id: str | int
    k: int  # text_index
    image: str
    sha256: str | None  # image_sha256; None in a line written before it existed (never reused)
    key: bytes | None  # _key(image, sha256, text)
    pngs: tuple[str | None, str] | None  # (mask_png, overlay_png), when it has them


class _Entry(NamedTuple):
    """A pair's line in the results a run ends with: manifest line and text index (the order), and where the line is."""

    line: int
    k: int
    source: str
    offset: int
    length: int
    verbatim: bool  # False: a reused line whose id, text_index or PNG fields change


def _key(image: str, sha256: str, text: str) -> bytes:
    """What makes two pairs the same question: the image path as written, its bytes' SHA-256, the expression."""
    return hashlib.blake2b(json.dumps([image, sha256, text]).encode(), digest_size=16).digest()


def _parse(source: str, raw: bytes, offset: int) -> _Line:
    record = json.loads(raw)
    image, sha256 = sys.intern(record["image"]), record.get("image_sha256")
    sha256 = None if sha256 is None else sys.intern(sha256)
    return _Line(source, offset, len(raw), record["id"], int(record["text_index"]), image, sha256,
                 None if sha256 is None else _key(image, sha256, record["text"]),
                 (record.get("mask_png"), record["overlay_png"]) if "overlay_png" in record else None)


def _scan(path: Path) -> tuple[list[_Line], int]:
    """The whole lines of a results file, and where the last one ends.

    Reading stops at the first line that is torn (no newline) or not a result; everything from
    there on is what a kill left behind.
    """
    lines: list[_Line] = []
    end = 0
    if not path.exists():
        return lines, end
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                lines.append(_parse(path.name, raw, end))
            except (ValueError, KeyError, TypeError, AttributeError):
                break
            end += len(raw)
    return lines, end


def _recover(path: Path) -> list[_Line]:
    """The lines of ``path``, after cutting off a torn tail so that appending is safe."""
    lines, end = _scan(path)
    if path.exists() and path.stat().st_size > end:
        with open(path, "r+b") as f:
            f.truncate(end)
    return lines


class _JsonlWriter:
    """Whole lines, each flushed at once: a reader (or a kill) sees complete lines plus at most one torn one."""

    def __init__(self, path: Path, mode: str) -> None:
        self.name = path.name
        self.file = open(path, mode + "b")

    def write(self, record: Mapping[str, Any]) -> tuple[int, int]:
        """Write ``record`` as a line; return where it starts and its length in bytes."""
        raw = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        offset = self.file.tell()
        self.file.write(raw)
        self.file.flush()
        return offset, len(raw)

    def close(self) -> None:
        self.file.close()


def _replace(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``path`` atomically (:func:`~sharedris.checkpoint.atomic_write`), streaming ``chunks``."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    atomic_write(path, write)


def _read_lines(out_dir: Path, places: Iterable[tuple[str, int, int]]) -> Iterator[bytes]:
    """The bytes at each ``(file name, offset, length)`` of ``places``, files in ``out_dir``."""
    files: dict[str, Any] = {}
    try:
        for source, offset, length in places:
            if source not in files:
                files[source] = open(out_dir / source, "rb")
            files[source].seek(offset)
            yield files[source].read(length)
    finally:
        for f in files.values():
            f.close()


def _archive(out_dir: Path, lines: Sequence[_Line]) -> None:
    """Append ``lines`` (of files in ``out_dir``) to replaced.jsonl, on disk before it returns."""
    if not lines:
        return
    _recover(out_dir / REPLACED)  # a kill while appending may have torn its last line
    with open(out_dir / REPLACED, "ab") as f:
        for raw in _read_lines(out_dir, ((line.source, line.offset, line.length) for line in lines)):
            f.write(raw)
        f.flush()
        os.fsync(f.fileno())


def _reused_line(raw: bytes, row: Row, k: int, save_png: bool) -> bytes:
    """A reused line as pair ``k`` of ``row`` has it: its id and text index, PNG fields only with ``save_png``."""
    record = json.loads(raw)
    record.update(id=row.id, text_index=k)
    if not save_png:
        record.pop("mask_png", None)
        record.pop("overlay_png", None)
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _finish_results(out_dir: Path, manifest: Manifest, entries: Sequence[_Entry], save_png: bool) -> None:
    """``results.jsonl`` := the lines of ``entries`` in manifest order, as a fresh run writes them; parts removed.

    Lines of results.jsonl and the rank parts that no entry uses go to replaced.jsonl first.
    """
    entries = sorted(entries)
    sources = [out_dir / RESULTS, *sorted(out_dir.glob(PARTS))]
    used = {(e.source, e.offset) for e in entries}
    present, end = _scan(sources[0])
    others = [line for src in sources[1:] for line in _scan(src)[0]]
    _archive(out_dir, [line for line in present + others if (line.source, line.offset) not in used])
    as_is = (sources[0].exists() and end == sources[0].stat().st_size and not others
             and all(e.verbatim for e in entries)
             and [(e.source, e.offset) for e in entries] == [(line.source, line.offset) for line in present])
    if not as_is:  # results.jsonl is not yet what a fresh run writes
        rows = {r.line: r for r in manifest.rows if isinstance(r, Row)}
        raws = _read_lines(out_dir, ((e.source, e.offset, e.length) for e in entries))
        _replace(out_dir / RESULTS, (raw if e.verbatim else _reused_line(raw, rows[e.line], e.k, save_png)
                                     for e, raw in zip(entries, raws)))
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


Plan = tuple[Union[str, None], list[list[Union[_Line, None]]]]  # an image's hash, and per row and pair its line


class _Run:
    """One rank's work: jobs -> reused lines, or batches of pairs -> the model -> result lines in order.

    ``earlier``: the lines already in the folder (all made with the run's model and settings).
    """

    def __init__(self, predictor: Predictor, out_dir: Path, results: _JsonlWriter, errors: _JsonlWriter,
                 batch_size: int, save_png: bool, bar: Any, lanes: int, earlier: Sequence[_Line]) -> None:
        self.predictor, self.out_dir, self.results, self.errors = predictor, out_dir, results, errors
        self.batch_size, self.save_png, self.bar, self.lanes = batch_size, save_png, bar, lanes
        self.done = {line.key: line for line in earlier if line.key is not None}
        self.latest = {line.image: line.sha256 for line in earlier if line.sha256 is not None}
        self.positions = {(str(line.id), line.k) for line in earlier}  # pairs a line was written for
        self.entries: list[_Entry] = []  # the line of every pair done, reused or predicted
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

    def _reusable(self, row: Row, k: int, sha256: str | None) -> _Line | None:
        """The line that answers pair ``k`` of ``row`` if its image has ``sha256``; with ``save_png``
        only one whose PNGs have the names this pair's have and are there."""
        line = None if sha256 is None else self.done.get(_key(row.image, sha256, row.texts[k]))
        if line is None or not self.save_png:
            return line
        mask, overlay_path = (str(p) for p in self._png_paths(row, k))
        if line.pngs is None or line.pngs[0] not in (None, mask) or line.pngs[1] != overlay_path:
            return None
        return line if all(Path(p).is_file() for p in line.pngs if p is not None) else None

    def _lines(self, group: list[_Job], sha256: str | None) -> list[list[_Line | None]]:
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

    def _take(self, job: _Job, lines: list[_Line | None], sha256: str, image: np.ndarray | None,
              size: tuple[int, int]) -> None:
        """Reuse the pairs of ``job`` that ``lines`` answer; queue the others for the model."""
        job.sha256 = sha256
        for k, line in enumerate(lines):
            if line is None:
                job.pending.append(k)
                continue
            same = (type(line.id), line.id, line.k) == (type(job.row.id), job.row.id, k)
            self.entries.append(_Entry(job.row.line, k, line.source, line.offset, line.length,
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
        output = SegmenterOutput(*(torch.cat(parts) for parts in zip(*job.outputs)))
        pred = self.predictor.postprocess(output, *job.size, texts=[job.row.texts[k] for k in job.pending])
        image = load_image(job.row.path) if self.save_png else None
        for n, k in enumerate(job.pending):
            record = _record(job.row, k, job.sha256, pred, n)
            if image is not None:  # PNGs first: a line in results.jsonl means its files are complete
                record.update(self._pngs(job.row, k, image, pred, n))
            offset, length = self.results.write(record)
            self.entries.append(_Entry(job.row.line, k, self.results.name, offset, length, True))
            if (str(job.row.id), k) in self.positions:
                self.recomputed += 1
            else:
                self.written += 1
        self._progress(len(job.pending))
        job.image = job.ids = job.pad = None
        job.outputs = []

    def _pngs(self, row: Row, k: int, image: Image.Image, pred: Prediction, n: int) -> dict[str, str | None]:
        """The mask and overlay PNGs of pair ``k`` of ``row`` (``n`` in ``pred``); no mask PNG for "no match"."""
        mask_path, overlay_path = self._png_paths(row, k)
        mask, matched = pred.masks[n], bool(pred.matched[n])
        if matched:
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        else:  # an earlier answer's mask
            mask_path.unlink(missing_ok=True)
        overlay(image, mask, row.texts[k], score=float(pred.scores[n]), present=float(pred.present[n]),
                matched=matched).save(overlay_path)
        return {"mask_png": str(mask_path) if matched else None, "overlay_png": str(overlay_path)}


def _record(row: Row, k: int, sha256: str, pred: Prediction, n: int) -> dict[str, Any]:
    """Pair ``k`` of ``row``, whose image file has ``sha256``, as a results line; ``n`` is its index in ``pred``."""
    height, width = pred.masks.shape[1:]
    return {"id": row.id, "text_index": k, "image": row.image, "image_sha256": sha256, "height": int(height),
            "width": int(width), **answer_record(row.texts[k], pred, n)}


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




def _predictor(model: nn.Module | Predictor, device: torch.device | str, precision: str, presence_threshold: float,
               runtime: str) -> tuple[Predictor, dict[str, Any]]:
    """The predictor to run (``model``, or one built from it on this rank's device) and its :func:`run_settings`."""
    if isinstance(model, Predictor):
        if _world_size() > 1 and not dist.is_initialized():
            init_distributed(model.device.type)
        return model, run_settings(model)
    predictor = Predictor(model, device=rank_device(device), precision=precision,
                          presence_threshold=presence_threshold, runtime=runtime)
    return predictor, run_settings(predictor, model)


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


def predict_manifest(model: nn.Module | Predictor, manifest: ManifestInput, out_dir: str | Path, *,
                     device: torch.device | str = DEFAULT_DEVICE, precision: str = DEFAULT_PRECISION,
                     presence_threshold: float = DEFAULT_PRESENCE_THRESHOLD, runtime: str = DEFAULT_RUNTIME,
                     batch_size: int = 16, workers: int | None = None,
                     lanes: int | None = None, save_png: bool = False, show_progress: bool = True,
                     fresh: bool = False) -> BulkSummary:
    """Segment every (image, expression) pair of ``manifest`` into ``out_dir/results.jsonl``.

    Each results line is ``{"id", "text_index", "image", "image_sha256", "text", "matched",
    "present", "score", "height", "width", "rle", "unknown_words"}`` (the SHA-256 of the image
    file's bytes; COCO RLE at the displayed size, empty where ``matched`` is false: the expression
    matches nothing; the expression's words the model does not know); bad rows go to
    ``out_dir/errors.jsonl`` as ``{"line", "id", "image", "reason"}``. ``out_dir/run.json`` holds
    the model and settings (:func:`run_settings`). A rerun reuses every pair the folder already
    answers (same image path and bytes, same expression) and predicts the others; afterwards
    ``results.jsonl`` is exactly what a fresh run writes, and its lines that no pair uses went to
    ``replaced.jsonl``. ``errors.jsonl`` is rewritten by every run and lists the rows that failed
    in it. Under torchrun every rank calls this; see the module docstring.

    Args:
        model: a Shared-RIS model, or a :class:`~sharedris.predictor.Predictor` (then ``device``,
            ``precision``, ``presence_threshold`` and ``runtime`` are its own; not an OpenVINO one,
            whose weights cannot be read to identify the results).
        manifest: a JSON Lines or CSV file, row mappings, or a :class:`Manifest`
            (see :func:`read_manifest`).
        out_dir: the output folder (created).
        device, precision, presence_threshold, runtime: as for :class:`~sharedris.predictor.Predictor`.
        batch_size: pairs per forward pass, from several images.
        workers: DataLoader worker processes reading and decoding images (0 = in this process);
            None = :func:`default_workers` for the predictor's device.
        lanes: batches in the model at once, each in its own thread with an equal share of torch's
            threads, while this thread decodes the next images and writes results in order; None =
            :func:`default_lanes` for the predictor's device. Torch's thread count is process-wide:
            with 2 or more lanes it is divided for the run and restored after.
        save_png: also write ``<id>__<text index>_mask.png`` (not for "no match") and ``_overlay.png`` per pair.
        show_progress: a progress bar of the pairs on stderr (rank 0 only).
        fresh: first delete the folder's earlier results (results.jsonl, replaced.jsonl, run.json).
    Returns:
        The counts of all ranks: pairs new, reused and recomputed, rows failed.
    Raises:
        ManifestError: the manifest cannot be read at all.
        ResultsMismatch: the folder holds results of another model or other settings (and not ``fresh``).
        ValueError: ``batch_size`` or ``lanes`` below 1, ``workers`` below 0, or an OpenVINO Predictor.
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
    lanes = default_lanes(predictor.device, predictor.runtime) if lanes is None else lanes
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _on_rank_0(lambda: _open_folder(out, settings, fresh), rank, world)
    results_path = out / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    earlier = _recover(out / RESULTS) + (_recover(results_path) if world > 1 else [])
    mine = manifest.rows[rank::world]
    jobs = [_Job(row) for row in mine if isinstance(row, Row)]
    results = _JsonlWriter(results_path, "a")
    errors = _JsonlWriter(out / (ERRORS if world == 1 else f"errors.rank{rank}.jsonl"), "w")
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
        _finish_results(out, manifest, [e for part in entries for e in part], run.save_png)
        _merge_errors(out, [out / (ERRORS if world == 1 else f"errors.rank{r}.jsonl") for r in range(world)])
    if world > 1:
        dist.barrier()  # results.jsonl is whole for every rank on return
    written, reused, recomputed, failed = (int(c) for c in counts.tolist())
    return BulkSummary(written, reused, recomputed, failed, out / RESULTS, out / ERRORS,
                       tuple(dict.fromkeys(w for part in words for w in part)))
