"""RefCOCO, RefCOCO+ and RefCOCOg in the refer format (docs/reference.md): one sample per sentence.

Layout under ``root``::

    refcoco/   instances.json  refs(unc).p
    refcoco+/  instances.json  refs(unc).p
    refcocog/  instances.json  refs(umd).p  refs(google).p
    images/train2014/COCO_train2014_%012d.jpg

The index is built once from the annotation files and holds only what a sample needs (per sentence:
image id, annotation id, text, ref id, sentence id; per used image: file name and size; per used
annotation: its segmentation). Images and masks are decoded lazily in ``__getitem__``.

``refs(X).p`` files are pickles: they are read with an unpickler that refuses every global, so a
tampered file cannot run code. Image file names come from ``instances.json``: the refs' own
``file_name`` carries an extra ``_<ref>`` suffix and names no file.
"""

from __future__ import annotations

import json
import operator
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sharedris.data.images import ImageError, read_dataset_image
from sharedris.data.sample import RefSample

SPLIT_BYS: dict[str, tuple[str, ...]] = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
SPLITS: dict[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
}
TEXT_FIELDS = ("raw", "sent")
MIN_POLYGON_NUMBERS = 6  # COCO drops polygons of fewer than 3 points

# (image_id, ann_ids, text, ref_id, sent_id): all a sample needs before decoding.
Sample = tuple[int, tuple[int, ...], str, int, int]


class ReferError(ValueError):
    """Refer-format files that cannot be used; the message names the file and the fix."""


def resolve_split_by(dataset: str, split_by: str | None = None, split: str | None = None) -> str:
    """Check ``dataset``/``split_by``/``split`` and return the split_by (the dataset's usual one if None)."""
    if dataset not in SPLIT_BYS:
        raise ValueError(f"unknown refer dataset {dataset!r}; valid datasets: {', '.join(SPLIT_BYS)}")
    split_by = split_by or SPLIT_BYS[dataset][0]
    if split_by not in SPLIT_BYS[dataset]:
        raise ValueError(f"{dataset} has no split_by {split_by!r}; valid: {', '.join(SPLIT_BYS[dataset])}")
    if split is not None and split not in SPLITS[split_by]:
        raise ValueError(f"{dataset} ({split_by}) has no split {split!r}; valid splits: "
                         f"{', '.join(SPLITS[split_by])}")
    return split_by


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Plain builtins only: a refs file never needs to import anything, so any import is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refuses to load {getattr(self, 'path', 'the pickle')}: it tries to import {module}.{name}, "
            "and a refs file holds only lists, dicts, strings and numbers")


def _unpickle(path: Path, encoding: str) -> Any:
    with open(path, "rb") as f:
        unpickler = _NoGlobalsUnpickler(f, encoding=encoding)
        unpickler.path = path
        return unpickler.load()


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``refs(X).p`` file: a Python-2-era pickle of ``list[dict]``, without importing anything.

    Python 2 ``str`` fields that are not ASCII are read as latin-1 (the pickle holds no encoding).
    Raises ReferError for a file that is not such a pickle, or that tries to import a global.
    """
    path = Path(path)
    try:
        try:
            refs = _unpickle(path, "ASCII")
        except UnicodeDecodeError:
            refs = _unpickle(path, "latin1")
    except pickle.UnpicklingError as e:
        if "refuses to load" in str(e):
            raise ReferError(str(e)) from None
        raise ReferError(f"{path} is not a readable refs pickle ({e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        raise ReferError(f"{path} is not a readable refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferError(f"{path} must hold a list of ref dicts, got {type(refs).__name__}")
    return refs


def _rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (the inverse of pycocotools' rleToString)."""
    out: list[int] = []
    data, p = counts.encode("ascii"), 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("the RLE string ends inside a number")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation -> bool mask (height, width).

    Polygons (a list of flat ``[x1, y1, x2, y2, ...]`` lists; those with fewer than 6 numbers are
    dropped) are merged into one mask, so overlapping polygons count once. RLE dicts take
    ``counts`` as a compressed string or an uncompressed list; their ``size`` must be
    ``[height, width]``. Raises ValueError for anything else.
    """
    try:
        rle = _to_rle(segmentation, height, width)
    except TypeError as e:  # a field of the wrong type somewhere inside
        raise ValueError(f"malformed segmentation ({e})") from None
    if rle is None:
        return np.zeros((height, width), dtype=bool)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=bool)


def _to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    if isinstance(segmentation, list):
        if not all(isinstance(p, (list, tuple)) for p in segmentation):
            raise ValueError("a polygon segmentation must be a list of coordinate lists")
        try:
            polygons = [[float(v) for v in p] for p in segmentation if len(p) >= MIN_POLYGON_NUMBERS]
        except (TypeError, ValueError):
            raise ValueError("polygon coordinates must be numbers") from None
        if not polygons:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image's [height, width] [{height}, {width}]")
        counts = segmentation["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        # pycocotools writes runs without bounds checks: a run total other than h*w would overflow.
        runs = [int(c) for c in counts] if isinstance(counts, list) else _rle_string_counts(counts)
        if any(r < 0 for r in runs) or sum(runs) != height * width:
            raise ValueError(f"RLE runs sum to {sum(runs)}, not height*width = {height * width}")
        if isinstance(counts, list):
            return mask_utils.frPyObjects({"size": size, "counts": runs}, height, width)
        return {"size": size, "counts": counts.encode("ascii")}
    raise ValueError(f"unsupported segmentation of type {type(segmentation).__name__}")


@dataclass
class ReferIndex:
    """What :func:`read_refer` found: samples and counts per split, the used images and annotations.

    ``images``: image id -> (file name, height, width); ``annotations``: ann id -> (image id,
    segmentation); ``counts``: split -> (refs, images, sentences); ``problems``: inconsistencies
    (a ref whose annotation or image is missing...) worded for the user; ``other_splits``: refs per
    split name outside the requested splits.
    """

    samples: dict[str, list[Sample]]
    images: dict[int, tuple[str, int, int]]
    annotations: dict[int, tuple[int, Any]]
    counts: dict[str, tuple[int, int, int]]
    problems: list[str] = field(default_factory=list)
    other_splits: dict[str, int] = field(default_factory=dict)


def _ann_ids(value: Any) -> tuple[int, ...]:
    """A ref's ``ann_id``: one id (RefCOCO family) or a list of ids (several referred objects)."""
    return tuple(int(a) for a in value) if isinstance(value, (list, tuple)) else (int(value),)


def read_refer(ref_dir: str | Path, split_by: str, splits: Sequence[str], text_field: str = "raw") -> ReferIndex:
    """Index ``<ref_dir>/refs(<split_by>).p`` and ``<ref_dir>/instances.json`` for ``splits``.

    Only the annotations and images used by refs of ``splits`` are kept. Raises
    FileNotFoundError for a missing file and ReferError for an unreadable one; inconsistencies
    between the two files are listed in ``problems``.
    """
    ref_dir = Path(ref_dir)
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {', '.join(TEXT_FIELDS)}, got {text_field!r}")
    refs_path, instances_path = ref_dir / f"refs({split_by}).p", ref_dir / "instances.json"
    for path in (refs_path, instances_path):
        if not path.is_file():
            where = "the dataset folder" if ref_dir.is_dir() else "the data root"
            raise FileNotFoundError(f"{path} does not exist; check {where} (--root / data.root / "
                                    "$SHAREDRIS_DATA must hold refcoco/, refcoco+/, refcocog/ and images/)")

    samples: dict[str, list[Sample]] = {s: [] for s in splits}
    refs_per_split = dict.fromkeys(splits, 0)
    images_per_split: dict[str, set[int]] = {s: set() for s in splits}
    other_splits: dict[str, int] = {}
    anns_of_ref: dict[int, tuple[tuple[int, ...], int]] = {}  # ref id -> (ann ids, image id)
    refs = load_refs(refs_path)
    for i, ref in enumerate(refs):
        try:
            split = ref["split"]
            if split not in samples:
                other_splits[str(split)] = other_splits.get(str(split), 0) + 1
                continue
            ref_id, image_id = int(ref["ref_id"]), int(ref["image_id"])
            ann_ids = _ann_ids(ref["ann_id"])
            for sent in ref["sentences"]:
                samples[split].append((image_id, ann_ids, str(sent[text_field]), ref_id, int(sent["sent_id"])))
        except KeyError as e:
            raise ReferError(f"{refs_path}: ref #{i} has no {e} field; is this a refer-format refs file?") from None
        except (TypeError, ValueError) as e:
            raise ReferError(f"{refs_path}: ref #{i} is malformed ({e})") from None
        refs_per_split[split] += 1
        images_per_split[split].add(image_id)
        anns_of_ref[ref_id] = (ann_ids, image_id)
    del refs  # the largest object here; gone before instances.json is parsed

    need_anns = {ann for anns, _ in anns_of_ref.values() for ann in anns}
    need_images = set().union(*images_per_split.values())
    images: dict[int, tuple[str, int, int]] = {}
    annotations: dict[int, tuple[int, Any]] = {}

    def keep_used(obj: dict[str, Any]) -> dict[str, Any] | None:
        # Called for every JSON object as it is parsed: unused annotations (and their polygons)
        # are dropped at once, so the whole file never lives as Python objects.
        if "segmentation" in obj and "image_id" in obj:
            if obj.get("id") in need_anns:
                annotations[obj["id"]] = (int(obj["image_id"]), obj["segmentation"])
            return None
        if "file_name" in obj and "height" in obj and "width" in obj and "id" in obj:
            if obj["id"] in need_images:
                images[obj["id"]] = (str(obj["file_name"]), int(obj["height"]), int(obj["width"]))
            return None
        return obj

    try:
        top = json.loads(instances_path.read_bytes(), object_hook=keep_used)
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ReferError(f"{instances_path} is not valid COCO instances JSON ({e}); re-download it") from None
    if not isinstance(top, dict) or "images" not in top or "annotations" not in top:
        raise ReferError(f"{instances_path} has no 'images' and 'annotations' lists; is it a COCO instances file?")

    problems = []
    for ref_id, (ann_ids, image_id) in anns_of_ref.items():
        for ann_id in ann_ids:
            if ann_id not in annotations:
                problems.append(f"ref {ref_id}: annotation {ann_id} is not in {instances_path}")
            elif annotations[ann_id][0] != image_id:
                problems.append(f"ref {ref_id}: annotation {ann_id} belongs to image {annotations[ann_id][0]}, "
                                f"not to the ref's image {image_id}")
        if image_id not in images:
            problems.append(f"ref {ref_id}: image {image_id} is not in {instances_path}")
    counts = {s: (refs_per_split[s], len(images_per_split[s]), len(samples[s])) for s in splits}
    return ReferIndex(samples, images, annotations, counts, problems, other_splits)


class RefDataset:
    """One split of RefCOCO / RefCOCO+ / RefCOCOg, one sample per sentence.

    ``ds[i]`` is a :class:`~sharedris.data.sample.RefSample`: ``image`` (PIL RGB at its stored size,
    no EXIF rotation: the size must match ``instances.json``), ``mask`` (bool HxW, the union of the
    referred annotations), ``text`` (the sentence's ``text_field``), ``ann_ids``, ``group`` (""
    : refer data has no breakdown key; report splits separately), plus ``ref_id``, ``sent_id``,
    ``image_id`` and ``split``.

    Args:
        root: the folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/`` and ``images/``.
        dataset: ``refcoco``, ``refcoco+`` or ``refcocog``.
        split_by: ``unc`` (refcoco, refcoco+), ``umd`` or ``google`` (refcocog); None = the usual one.
        split: ``train``/``val``/``testA``/``testB`` (unc), ``train``/``val``/``test`` (umd),
            ``train``/``val`` (google).
        image_root: where the COCO train2014 images are; default ``<root>/images/train2014``.
        text_field: ``raw`` (the typed text, what LAVT feeds) or ``sent`` (cleaned lower case).
    """

    groups: tuple[str, ...] = ()

    def __init__(self, root: str | Path, dataset: str = "refcoco", split_by: str | None = None,
                 split: str = "val", image_root: str | Path | None = None, text_field: str = "raw") -> None:
        self.split_by = resolve_split_by(dataset, split_by, split)
        self.root, self.dataset, self.split, self.text_field = Path(root), dataset, split, text_field
        self.image_root = Path(image_root) if image_root is not None else self.root / "images" / "train2014"
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist; set --root / data.root / "
                                    "$SHAREDRIS_DATA to the folder holding refcoco/, refcoco+/, refcocog/ and images/")
        index = read_refer(self.root / dataset, self.split_by, [split], text_field)
        if index.problems:
            more = f" (and {len(index.problems) - 1} more)" if len(index.problems) > 1 else ""
            raise ReferError(f"{index.problems[0]}{more}; `sharedris data check --root {self.root}` lists them all")
        self._samples = index.samples[split]
        self._images = index.images
        self._annotations = index.annotations
        self.num_refs, self.num_images, _ = index.counts[split]

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> RefSample:
        index = operator.index(index)
        image_id, ann_ids, text, ref_id, sent_id = self._samples[index]
        file_name, height, width = self._images[image_id]
        image = self._read_image(self.image_root / file_name, height, width)
        mask = np.zeros((height, width), dtype=bool)
        for ann_id in ann_ids:  # several referred objects: the target is their union
            try:
                mask |= decode_segmentation(self._annotations[ann_id][1], height, width)
            except ValueError as e:
                raise ReferError(f"annotation {ann_id} in {self.root / self.dataset / 'instances.json'} "
                                 f"cannot be decoded: {e}") from None
        return {"image": image, "mask": mask, "text": text, "ann_ids": list(ann_ids), "group": "",
                "ref_id": ref_id, "sent_id": sent_id, "image_id": image_id, "split": self.split}

    @staticmethod
    def _read_image(path: Path, height: int, width: int) -> Image.Image:
        try:
            return read_dataset_image(path, height, width)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} does not exist; point --root / data.root / $SHAREDRIS_DATA (or image_root) "
                "at the folder whose images/train2014 holds the COCO train2014 images") from None
        except ImageError as e:
            raise ReferError(f"{e}; re-download it") from None

    def __repr__(self) -> str:
        return (f"RefDataset({self.dataset}/{self.split_by} {self.split}: {len(self)} sentences, "
                f"{self.num_refs} refs, {self.num_images} images)")


def data_root(root: str | Path | None) -> Path:
    """``root``, else ``$SHAREDRIS_DATA``; neither -> ValueError."""
    root = root or os.environ.get("SHAREDRIS_DATA")
    if not root:
        raise ValueError("no refer data root: set data.root or SHAREDRIS_DATA (or pass --root)")
    return Path(root)
