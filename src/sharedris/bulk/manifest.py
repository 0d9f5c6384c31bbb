"""Manifest reading: JSON Lines or CSV files, row mappings, image files, folders and glob patterns -> a
:class:`Manifest` of checked rows.

Each row is checked on its own: a bad one becomes a :class:`BadRow` with one sentence saying why,
never an exception; only a manifest that cannot be read at all raises :class:`ManifestError`.
Relative image paths are relative to the manifest's folder. Nothing here needs a model.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from PIL import Image

from sharedris.text import validate_texts

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
