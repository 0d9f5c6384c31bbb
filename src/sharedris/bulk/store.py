"""The results store: an output folder's ``results.jsonl``, ``run.json``, ``replaced.jsonl`` and rank parts.

* **Lines.** :class:`JsonlWriter` appends whole lines, each flushed at once; :func:`recover` reads
  a results file's whole lines (:class:`Line`: where each is, the pair it answers and its
  :func:`pair_key`) and cuts off the torn tail a kill may leave, so that appending is safe.
* **run.json.** :func:`run_settings` is what decides every answer besides the image and the
  expression; :func:`open_folder` checks a folder's ``run.json`` against it (:class:`ResultsMismatch`
  when it differs), or writes it, after moving result lines of unknown origin to ``replaced.jsonl``.
* **The end of a run.** :func:`finish_results` writes ``results.jsonl`` from the lines every pair
  uses (:class:`Entry`), in manifest order, as a fresh run writes it, merging the rank parts; the
  lines no pair uses move to ``replaced.jsonl`` first. :func:`merge_errors` writes ``errors.jsonl``
  from the ranks' error lines, by manifest line.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from sharedris.bulk.manifest import Manifest, Row
from sharedris.checkpoint import atomic_write

if TYPE_CHECKING:
    from sharedris.predictor import Predictor

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
REPLACED = "replaced.jsonl"
RUN = "run.json"
PARTS = "results.rank*.jsonl"


def rank_file(name: str, rank: int, world: int) -> str:
    """The file a rank writes for ``name`` (:data:`RESULTS` or :data:`ERRORS`): ``name`` itself when it
    runs alone, else its own part, ``results.rank{rank}.jsonl`` / ``errors.rank{rank}.jsonl``."""
    return name if world == 1 else f"{Path(name).stem}.rank{rank}.jsonl"


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


# ---------------------------------------------------------------- run.json: model and settings
def run_settings(predictor: Predictor) -> dict[str, Any]:
    """What decides every answer besides the image and the expression, as ``run.json`` stores it.

    ``model_sha256`` covers the model's config, tokenizer file, vocabulary and weights. The weights
    are those that run: on PyTorch the predictor's module (the model at fp32, its bf16 or int8 copy
    otherwise, the same bytes for the same model and precision); an OpenVINO predictor runs a
    compiled model whose weights cannot be read, so there the digest of the weights it was
    converted from counts instead. Then ``precision`` (the concrete one), ``runtime`` and
    ``presence_threshold``. The device, batch size, lanes and threads are left out: like two
    machines, they change results only at the level of floating-point rounding.
    """
    module = predictor.runner.module
    digest = hashlib.sha256()
    vocabulary = None if predictor.vocabulary is None else sorted(predictor.vocabulary)
    digest.update(json.dumps([predictor.config.to_dict(), vocabulary], sort_keys=True).encode())
    digest.update(predictor.tokenizer.model_file.read_bytes())
    if predictor.runtime == "openvino":
        digest.update(module.weights_sha256.encode())
    for name, tensor in sorted(module.state_dict().items() if predictor.runtime == "torch" else ()):
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


def open_folder(out: Path, settings: Mapping[str, Any], fresh: bool) -> None:
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
    _archive(out, [line for src in sources for line in recover(src)])
    for src in sources:
        src.unlink(missing_ok=True)
    atomic_write(run, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8"))


# --------------------------------------------------------------------------------- result files
@dataclass(frozen=True, slots=True)
class Line:
    """A whole line of a results file: where it is, the pair it was written for, and what it answers."""

    source: str  # its file's name in the output folder
    offset: int
    length: int
    id: str | int
    k: int  # text_index
    image: str
    sha256: str | None  # image_sha256; None in a line written before it existed (never reused)
    key: bytes | None  # pair_key(image, sha256, text)
    pngs: tuple[str | None, str] | None  # (mask_png, overlay_png), when it has them


class Entry(NamedTuple):
    """A pair's line in the results a run ends with: manifest line and text index (the order), and where the line is."""

    line: int
    k: int
    source: str
    offset: int
    length: int
    verbatim: bool  # False: a reused line whose id, text_index or PNG fields change


def pair_key(image: str, sha256: str, text: str) -> bytes:
    """What makes two pairs the same question: the image path as written, its bytes' SHA-256, the expression."""
    return hashlib.blake2b(json.dumps([image, sha256, text]).encode(), digest_size=16).digest()


def _parse(source: str, raw: bytes, offset: int) -> Line:
    record = json.loads(raw)
    image, sha256 = sys.intern(record["image"]), record.get("image_sha256")
    sha256 = None if sha256 is None else sys.intern(sha256)
    return Line(source, offset, len(raw), record["id"], int(record["text_index"]), image, sha256,
                 None if sha256 is None else pair_key(image, sha256, record["text"]),
                 (record.get("mask_png"), record["overlay_png"]) if "overlay_png" in record else None)


def _scan(path: Path) -> tuple[list[Line], int]:
    """The whole lines of a results file, and where the last one ends.

    Reading stops at the first line that is torn (no newline) or not a result; everything from
    there on is what a kill left behind.
    """
    lines: list[Line] = []
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


def recover(path: Path) -> list[Line]:
    """The lines of ``path``, after cutting off a torn tail so that appending is safe."""
    lines, end = _scan(path)
    if path.exists() and path.stat().st_size > end:
        with open(path, "r+b") as f:
            f.truncate(end)
    return lines


class JsonlWriter:
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


def _archive(out_dir: Path, lines: Sequence[Line]) -> None:
    """Append ``lines`` (of files in ``out_dir``) to replaced.jsonl, on disk before it returns."""
    if not lines:
        return
    recover(out_dir / REPLACED)  # a kill while appending may have torn its last line
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


def finish_results(out_dir: Path, manifest: Manifest, entries: Sequence[Entry], save_png: bool) -> None:
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


def merge_errors(out_dir: Path, sources: Sequence[Path]) -> None:
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
