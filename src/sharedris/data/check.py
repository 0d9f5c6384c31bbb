"""`sharedris data check`: is a refer-format data root complete and readable?

For each dataset folder (and each of its refs files) it reads the annotation files, opens every
image a ref uses (present, decodable, of the size ``instances.json`` says) and decodes every
referred annotation, then prints refs/images/sentences per split next to the official counts.
Problems (missing or corrupt files, inconsistent ids) are collected, not raised, so one run lists
them all. Counts that differ from the official release are flagged but are not problems (a subset
or a synthetic fixture is fine to use).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from sharedris.data.images import ImageError, read_dataset_image
from sharedris.data.refer import SPLIT_BYS, SPLITS, ReferError, decode_segmentation, read_refer, resolve_split_by
from sharedris.progress import progress as progress_bar

# docs/reference.md (counts from lichengunc/refer): (dataset, split_by) -> split -> (refs, images, sentences).
OFFICIAL_COUNTS: dict[tuple[str, str], dict[str, tuple[int, int, int]]] = {
    ("refcoco", "unc"): {"train": (42404, 16994, 120624), "val": (3811, 1500, 10834),
                         "testA": (1975, 750, 5657), "testB": (1810, 750, 5095)},
    ("refcoco+", "unc"): {"train": (42278, 16992, 120191), "val": (3805, 1500, 10758),
                          "testA": (1975, 750, 5726), "testB": (1798, 750, 4889)},
    ("refcocog", "umd"): {"train": (42226, 21899, 80512), "val": (2573, 1300, 4896), "test": (5023, 2600, 9602)},
    ("refcocog", "google"): {"train": (44822, 24698, 85474), "val": (5000, 4650, 9536)},
}
# Sentence counts read off secondary sources only: shown with "~".
UNVERIFIED_SENTENCES = {("refcocog", "umd"), ("refcocog", "google")}


def _check_image(path: Path, height: int, width: int) -> str | None:
    """None if the file is a decodable image of ``width`` x ``height``, else the problem."""
    try:
        read_dataset_image(path, height, width, check_only=True)
    except FileNotFoundError:
        return f"image {path} is missing"
    except ImageError as e:
        return str(e)
    return None


def _count_cell(found: int, official: int | None, approx: bool = False) -> tuple[str, bool]:
    if official is None:
        return f"{found:>7,} {'':>9}", False
    differs = found != official
    mark = "*" if differs else " "
    return f"{found:>7,} {('~' if approx else ' ') + format(official, ','):>8}{mark}", differs


def check_root(root: str | Path, dataset: str | None = None, split_by: str | None = None,
               image_root: str | Path | None = None, progress: bool = True,
               echo: Callable[[str], None] = print) -> list[str]:
    """Check a refer-format data root; print a report through ``echo`` and return the problems.

    Args:
        dataset: one of refcoco, refcoco+, refcocog; None = every one whose folder exists.
        split_by: check only refs files of this split_by; None = every supported refs file present.
        image_root: default ``<root>/images/train2014``.
    Returns:
        One sentence per problem; empty when the data is usable.
    """
    root = Path(root)
    image_root = Path(image_root) if image_root is not None else root / "images" / "train2014"
    if not root.is_dir():
        return [f"data root {root} does not exist"]
    if dataset is not None:
        resolve_split_by(dataset, split_by)  # a wrong name is a usage error, raised
        datasets = [dataset]
    else:
        if split_by is not None and split_by not in SPLITS:
            raise ValueError(f"unknown split_by {split_by!r}; valid: {', '.join(SPLITS)}")
        datasets = [d for d in SPLIT_BYS if (root / d).is_dir() and split_by in (None, *SPLIT_BYS[d])]
        if not datasets:
            return [f"{root} holds none of {', '.join(d + '/' for d in SPLIT_BYS)}: is it the refer data root?"]
    if not image_root.is_dir():
        return [f"image folder {image_root} does not exist (expected COCO train2014 images there)"]

    problems: list[str] = []
    checked_images: dict[tuple[str, int, int], str | None] = {}  # shared by the datasets
    any_differs = False
    for name in datasets:
        ref_dir = root / name
        if not ref_dir.is_dir():
            problems.append(f"dataset folder {ref_dir} is missing")
            continue
        split_bys = [split_by] if split_by else [s for s in SPLIT_BYS[name] if (ref_dir / f"refs({s}).p").is_file()]
        if not split_bys:
            problems.append(f"{ref_dir} has no refs file ({', '.join(f'refs({s}).p' for s in SPLIT_BYS[name])})")
            continue
        for sb in split_bys:
            echo(f"{name}/{sb}  ({ref_dir})")
            try:
                index = read_refer(ref_dir, sb, SPLITS[sb])
            except (OSError, ReferError) as e:
                problems.append(str(e))
                echo(f"  unreadable: {e}")
                continue
            problems.extend(index.problems)
            official = OFFICIAL_COUNTS.get((name, sb), {})
            echo(f"  {'split':<6} {'refs / official':>20} {'images / official':>20} {'sentences / official':>20}")
            for split, counts in index.counts.items():
                cells = []
                for k, found in enumerate(counts):
                    ref = official.get(split)
                    approx = k == 2 and (name, sb) in UNVERIFIED_SENTENCES
                    cell, differs = _count_cell(found, ref[k] if ref else None, approx)
                    cells.append(cell)
                    any_differs |= differs and not approx
                echo(f"  {split:<6} " + " ".join(f"{c:>20}" for c in cells))
            for other, n in sorted(index.other_splits.items()):
                echo(f"  note: {n} refs of split {other!r}, not a {sb} split, are not used")

            todo = sorted(set(index.images.values()) - set(checked_images))
            for file_name, height, width in progress_bar(todo, desc=f"{name}/{sb} images", disable=not progress,
                                                 leave=False):
                checked_images[(file_name, height, width)] = _check_image(image_root / file_name, height, width)
            bad = {checked_images[info] for info in index.images.values()} - {None}
            problems.extend(sorted(bad))

            empty = 0
            for ann_id, (image_id, segmentation) in index.annotations.items():
                if image_id not in index.images:
                    continue  # already a problem of read_refer
                _, height, width = index.images[image_id]
                try:
                    empty += not decode_segmentation(segmentation, height, width).any()
                except ValueError as e:
                    problems.append(f"annotation {ann_id} in {ref_dir / 'instances.json'} cannot be decoded: {e}")
            echo(f"  {len(index.images):,} images and {len(index.annotations):,} referred annotations checked"
                 + (f"; note: {empty} masks are empty" if empty else ""))
    if any_differs:
        echo("* differs from the official release (fine for a subset or synthetic data)")
    return list(dict.fromkeys(problems))  # an image shared by two datasets is one problem
