"""RefCOCO, RefCOCO+, RefCOCOg and gRefCOCO in the refer format (docs/reference.md): one sample per sentence.

Layout under ``root``::

    refcoco/   instances.json  refs(unc).p
    refcoco+/  instances.json  refs(unc).p
    refcocog/  instances.json  refs(umd).p  refs(google).p
    grefcoco/  instances.json  grefs(unc).json  (or grefs(unc).p, tried first, as ReLA's loader does)
    images/train2014/COCO_train2014_%012d.jpg

The index is built once from the annotation files and holds only what a sample needs (per sentence:
image id, annotation ids, text, ref id, sentence id; per used image: file name and size; per used
annotation: its segmentation). Images and masks are decoded lazily in ``__getitem__``.

A ref's ``ann_id`` is one id (RefCOCO family) or a list (gRefCOCO): several ids make the target
the union of those annotations, crowd annotations left out (as ReLA does); ``[-1]`` means the
expression refers to nothing (gRefCOCO's ``no_target``), so the mask is empty.

``.p`` refs files are pickles: they are read with an unpickler that refuses every global, so a
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

SPLIT_BYS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("umd", "google"), "grefcoco": ("unc",),
}
# Refs file names per dataset, in the order they are tried ({} is the split_by); default: REFS_FILE.
REFS_FILE = "refs({}).p"
REFS_FILES: dict[str, tuple[str, ...]] = {"grefcoco": ("grefs({}).p", "grefs({}).json")}
NO_TARGET_ANN_ID = -1  # gRefCOCO's ann_id [-1]: the expression refers to no object
_DATA_ROOT_FOLDERS = f"{', '.join(d + '/' for d in SPLIT_BYS)} and images/"  # for error messages
SPLITS: dict[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
    "google": ("train", "val"),
}
TEXT_FIELDS = ("raw", "sent")
MIN_POLYGON_NUMBERS = 6  # COCO drops polygons of fewer than 3 points

# (image_id, ann_ids, text, ref_id, sent_id): all a sample needs before decoding; ann_ids is
# empty for an expression that refers to nothing.
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


def refs_file_names(dataset: str, split_by: str) -> tuple[str, ...]:
    """The refs files ``dataset``/``split_by`` may have, in the order they are tried."""
    return tuple(name.format(split_by) for name in REFS_FILES.get(dataset, (REFS_FILE,)))


def find_refs_file(ref_dir: str | Path, dataset: str, split_by: str) -> Path:
    """The first of :func:`refs_file_names` present in ``ref_dir``; the last one when none is."""
    paths = [Path(ref_dir) / name for name in refs_file_names(dataset, split_by)]
    return next((p for p in paths if p.is_file()), paths[-1])


def _unpickle(path: Path, encoding: str) -> Any:
    with open(path, "rb") as f:
        unpickler = _NoGlobalsUnpickler(f, encoding=encoding)
        unpickler.path = path
        return unpickler.load()


def load_refs(path: str | Path) -> list[dict[str, Any]]:
    """Read a refs file: a ``.json`` list of ref dicts, or a pickle of one, without importing anything.

    Pickles (``refs(X).p``) are Python-2-era: ``str`` fields that are not ASCII are read as
    latin-1 (the pickle holds no encoding). Raises ReferError for a file that is not such a list,
    or a pickle that tries to import a global.
    """
    path = Path(path)
    if path.suffix == ".json":
        try:
            refs = json.loads(path.read_bytes())
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ReferError(f"{path} is not valid JSON ({e}); re-download it") from None
    else:
        refs = _load_refs_pickle(path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferError(f"{path} must hold a list of ref dicts, got {type(refs).__name__}")
    return refs


def _load_refs_pickle(path: Path) -> Any:
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
    segmentation), the annotations some sample's mask is made from; ``counts``: split -> (refs,
    images, sentences) over refs with sentences; ``target_counts``: split -> (no-target sentences,
    multi-target sentences); ``problems``: inconsistencies (a ref whose annotation or image is
    missing...) worded for the user; ``other_splits``: refs per split name outside the requested
    splits; ``sentenceless_refs``: split -> refs without sentences (they give no samples and are
    not counted).
    """

    samples: dict[str, list[Sample]]
    images: dict[int, tuple[str, int, int]]
    annotations: dict[int, tuple[int, Any]]
    counts: dict[str, tuple[int, int, int]]
    target_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    other_splits: dict[str, int] = field(default_factory=dict)
    sentenceless_refs: dict[str, int] = field(default_factory=dict)


def _targets(ref: dict[str, Any]) -> tuple[tuple[int, ...], str | None]:
    """A ref's referred annotation ids (empty: it refers to nothing) and what is wrong with them, if anything.

    ``ann_id`` is one id (RefCOCO family) or a list (gRefCOCO), ``[-1]`` meaning no target; a
    gRefCOCO ``no_target`` flag must agree with it.
    """
    value = ref["ann_id"]
    listed = tuple(int(a) for a in value) if isinstance(value, (list, tuple)) else (int(value),)
    targets = tuple(a for a in listed if a != NO_TARGET_ANN_ID)
    flag = ref.get("no_target")
    if not listed:
        return targets, f"ann_id is an empty list (an expression without a target has [{NO_TARGET_ANN_ID}])"
    if targets and len(targets) != len(listed):
        return targets, f"ann_id {list(listed)} mixes {NO_TARGET_ANN_ID} (no target) with annotation ids"
    if flag is not None and bool(flag) != (not targets):
        return targets, f"no_target is {flag!r} but ann_id is {list(listed)}"
    return targets, None


def read_refer(ref_dir: str | Path, split_by: str, splits: Sequence[str], text_field: str = "raw",
               dataset: str | None = None) -> ReferIndex:
    """Index the refs file of ``dataset``/``split_by`` and ``<ref_dir>/instances.json`` for ``splits``.

    ``dataset`` (default: the name of ``ref_dir``) picks the refs file (:func:`find_refs_file`).
    Only the annotations and images used by refs of ``splits`` are kept. A ref that lists several
    annotations refers to their union without its crowd annotations (ReLA drops crowd regions; a
    ref whose annotations are all crowd keeps them, or its target would vanish). Raises
    FileNotFoundError for a missing file and ReferError for an unreadable one; inconsistencies
    between the two files are listed in ``problems``.
    """
    ref_dir = Path(ref_dir)
    if text_field not in TEXT_FIELDS:
        raise ValueError(f"text_field must be one of {', '.join(TEXT_FIELDS)}, got {text_field!r}")
    refs_path = find_refs_file(ref_dir, dataset or ref_dir.name, split_by)
    instances_path = ref_dir / "instances.json"
    for path in (refs_path, instances_path):
        if not path.is_file():
            where = "the dataset folder" if ref_dir.is_dir() else "the data root"
            raise FileNotFoundError(f"{path} does not exist; check {where} (--root / data.root / "
                                    f"$SHAREDRIS_DATA must hold {_DATA_ROOT_FOLDERS})")

    scan = _scan_refs(refs_path, splits, text_field)  # the refs themselves are gone once it returns
    need_images = set().union(*scan.images_per_split.values())
    images, annotations, crowd = _load_instances(instances_path, scan.needed_annotations(), need_images)
    problems = scan.problems + _missing_links(scan.anns_of_ref, images, annotations, instances_path)
    if crowd:
        _drop_crowd_from_unions(scan.samples, annotations, crowd)
    counts = {s: (scan.refs_per_split[s], len(scan.images_per_split[s]), len(scan.samples[s])) for s in splits}
    target_counts = {s: (scan.no_target[s], scan.multi_target[s]) for s in splits}
    return ReferIndex(scan.samples, images, annotations, counts, target_counts, problems, scan.other_splits,
                      scan.sentenceless)


@dataclass
class _RefScan:
    """What one pass over a refs file keeps for ``splits``."""

    samples: dict[str, list[Sample]]
    refs_per_split: dict[str, int]
    images_per_split: dict[str, set[int]]
    no_target: dict[str, int]
    multi_target: dict[str, int]
    sentenceless: dict[str, int]
    other_splits: dict[str, int] = field(default_factory=dict)
    anns_of_ref: dict[int, tuple[tuple[int, ...], int]] = field(default_factory=dict)  # ref -> (anns, image)
    problems: list[str] = field(default_factory=list)

    def needed_annotations(self) -> set[int]:
        return {ann for anns, _ in self.anns_of_ref.values() for ann in anns}


def _scan_refs(refs_path: Path, splits: Sequence[str], text_field: str) -> _RefScan:
    """One sample per sentence of each ref of ``splits``, with counts and the refs' own problems."""
    scan = _RefScan({s: [] for s in splits}, dict.fromkeys(splits, 0), {s: set() for s in splits},
                    dict.fromkeys(splits, 0), dict.fromkeys(splits, 0), dict.fromkeys(splits, 0))
    for i, ref in enumerate(load_refs(refs_path)):
        try:
            split = ref["split"]
            if split not in scan.samples:
                scan.other_splits[str(split)] = scan.other_splits.get(str(split), 0) + 1
                continue
            ref_id, image_id = int(ref["ref_id"]), int(ref["image_id"])
            ann_ids, problem = _targets(ref)
            sentences = ref["sentences"]
            for sent in sentences:
                scan.samples[split].append((image_id, ann_ids, str(sent[text_field]), ref_id, int(sent["sent_id"])))
        except KeyError as e:
            raise ReferError(f"{refs_path}: ref #{i} has no {e} field; is this a refer-format refs file?") from None
        except (TypeError, ValueError) as e:
            raise ReferError(f"{refs_path}: ref #{i} is malformed ({e})") from None
        if not sentences:
            scan.sentenceless[split] += 1
            continue
        if problem:
            scan.problems.append(f"ref {ref_id}: {problem}")
        scan.refs_per_split[split] += 1
        scan.images_per_split[split].add(image_id)
        scan.no_target[split] += len(sentences) * (not ann_ids)
        scan.multi_target[split] += len(sentences) * (len(ann_ids) > 1)
        scan.anns_of_ref[ref_id] = (ann_ids, image_id)
    return scan


def _load_instances(instances_path: Path, need_anns: set[int], need_images: set[int]
                    ) -> tuple[dict[int, tuple[str, int, int]], dict[int, tuple[int, Any]], set[int]]:
    """The images and annotations of ``instances_path`` that are needed, and which of those are crowd."""
    images: dict[int, tuple[str, int, int]] = {}
    annotations: dict[int, tuple[int, Any]] = {}
    crowd: set[int] = set()

    def keep_used(obj: dict[str, Any]) -> dict[str, Any] | None:
        # Called for every JSON object as it is parsed: unused annotations (and their polygons)
        # are dropped at once, so the whole file never lives as Python objects.
        if "segmentation" in obj and "image_id" in obj:
            if obj.get("id") in need_anns:
                annotations[obj["id"]] = (int(obj["image_id"]), obj["segmentation"])
                if obj.get("iscrowd"):
                    crowd.add(obj["id"])
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
    return images, annotations, crowd


def _missing_links(anns_of_ref: dict[int, tuple[tuple[int, ...], int]], images: dict, annotations: dict,
                   instances_path: Path) -> list[str]:
    """Refs whose annotations or image ``instances_path`` lacks, or whose annotation is another image's."""
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
    return problems


def _drop_crowd_from_unions(samples: dict[str, list[Sample]], annotations: dict[int, tuple[int, Any]],
                            crowd: set[int]) -> None:
    """In place: samples of several annotations lose the crowd ones (unless all are), and
    ``annotations`` keeps only those some mask is made from."""
    for split_samples in samples.values():
        for k, (image_id, ann_ids, text, ref_id, sent_id) in enumerate(split_samples):
            kept = tuple(a for a in ann_ids if a not in crowd)
            if len(ann_ids) > 1 and kept and len(kept) < len(ann_ids):
                split_samples[k] = (image_id, kept, text, ref_id, sent_id)
    used = {a for split_samples in samples.values() for _, ann_ids, *_ in split_samples for a in ann_ids}
    for ann_id in set(annotations) - used:
        del annotations[ann_id]


class RefDataset:
    """One split of RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO, one sample per sentence.

    ``ds[i]`` is a :class:`~sharedris.data.sample.RefSample`: ``image`` (PIL RGB at its stored size,
    no EXIF rotation: the size must match ``instances.json``), ``mask`` (bool HxW, the union of the
    referred annotations; all False when the expression refers to nothing), ``text`` (the
    sentence's ``text_field``), ``ann_ids`` (those the mask is made from; empty when nothing is
    referred to), ``group`` ("": refer data has no breakdown key; report splits separately), plus
    ``no_target`` (True exactly when ``ann_ids`` is empty: gRefCOCO's no-target expressions),
    ``ref_id``, ``sent_id``, ``image_id`` and ``split``.

    Args:
        root: the folder holding ``refcoco/``, ``refcoco+/``, ``refcocog/``, ``grefcoco/`` and ``images/``.
        dataset: ``refcoco``, ``refcoco+``, ``refcocog`` or ``grefcoco``.
        split_by: ``unc`` (refcoco, refcoco+, grefcoco), ``umd`` or ``google`` (refcocog); None = the usual one.
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
                                    f"$SHAREDRIS_DATA to the folder holding {_DATA_ROOT_FOLDERS}")
        index = read_refer(self.root / dataset, self.split_by, [split], text_field, dataset=dataset)
        if index.problems:
            more = f" (and {len(index.problems) - 1} more)" if len(index.problems) > 1 else ""
            raise ReferError(f"{index.problems[0]}{more}; `sharedris data check --root {self.root} "
                             f"--dataset {dataset}` lists them all")
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
                "no_target": not ann_ids, "ref_id": ref_id, "sent_id": sent_id, "image_id": image_id,
                "split": self.split}

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
