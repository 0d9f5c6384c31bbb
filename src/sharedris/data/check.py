"""`sharedris data check`: is a refer-format data root complete and readable?

For each dataset folder (and each of its refs files) it reads the annotation files, opens every
image a ref uses (present, decodable, of the size ``instances.json`` says) and decodes every
referred annotation, then prints refs/images/sentences per split next to the official counts
(gRefCOCO: also its no-target and multi-target expressions, and the total over the splits).
Problems (missing or corrupt files, inconsistent ids) are collected, not raised, so one run lists
them all. Counts that differ from the official release are flagged but are not problems (a subset
or a synthetic fixture is fine to use).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Callable

from sharedris.data.images import ImageError, read_dataset_image
from sharedris.data.refer import (
    SPLIT_BYS,
    SPLITS,
    ReferError,
    ReferIndex,
    decode_segmentation,
    find_refs_file,
    read_refer,
    refs_file_names,
    resolve_split_by,
)
from sharedris.progress import progress as progress_bar

# docs/reference.md (counts from lichengunc/refer; gRefCOCO: the GRES paper and ReLA's files):
# (dataset, split_by) -> split -> (refs, images, sentences), None where no count is published.
OFFICIAL_COUNTS: dict[tuple[str, str], dict[str, tuple[int | None, int | None, int | None]]] = {
    ("refcoco", "unc"): {"train": (42404, 16994, 120624), "val": (3811, 1500, 10834),
                         "testA": (1975, 750, 5657), "testB": (1810, 750, 5095)},
    ("refcoco+", "unc"): {"train": (42278, 16992, 120191), "val": (3805, 1500, 10758),
                          "testA": (1975, 750, 5726), "testB": (1798, 750, 4889)},
    ("refcocog", "umd"): {"train": (42226, 21899, 80512), "val": (2573, 1300, 4896), "test": (5023, 2600, 9602)},
    ("refcocog", "google"): {"train": (44822, 24698, 85474), "val": (5000, 4650, 9536)},
    ("grefcoco", "unc"): {"train": (None, 16994, None), "val": (None, 1500, None),
                          "testA": (None, 750, None), "testB": (None, 750, None)},
}
# (dataset, split_by, split, column) of counts read off secondary sources or only approximate:
# shown with "~" and never flagged.
APPROXIMATE: set[tuple[str, str, str, int]] = {
    *(("refcocog", "umd", s, 2) for s in SPLITS["umd"]),
    *(("refcocog", "google", s, 2) for s in SPLITS["google"]),
    ("grefcoco", "unc", "train", 1),
}
# Sentences in the whole released file, where only that total is published.
OFFICIAL_TOTAL_SENTENCES: dict[tuple[str, str], int] = {("grefcoco", "unc"): 259859}
# Datasets whose expressions may refer to no object or to several: their table counts those too.
GENERALIZED = ("grefcoco",)
CELL_WIDTH = 22  # the widest header, "expressions / official"


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
    """``found`` next to ``official`` (``~`` when approximate, ``*`` when they differ) and whether they do."""
    if official is None:
        return f"{found:>7,} {'':>9}", False
    differs = found != official and not approx
    mark = "*" if differs else " "
    return f"{found:>7,} {('~' if approx else ' ') + format(official, ','):>8}{mark}", differs


def _table_row(label: str, found: Sequence[int], official: Sequence[int | None],
               approx: Collection[int]) -> tuple[str, bool]:
    """One table line and whether a count differs from its official one.

    The first three columns (refs, images, sentences) stand next to ``official`` (None or missing:
    not published); further columns (no-target, multi-target) have no official counts.
    """
    cells, differs = [], False
    for k, n in enumerate(found):
        if k >= 3:
            cells.append(f"{n:,}")
            continue
        cell, cell_differs = _count_cell(n, official[k] if k < len(official) else None, k in approx)
        cells.append(cell)
        differs |= cell_differs
    return f"  {label:<6} " + " ".join(f"{c:>{CELL_WIDTH}}" for c in cells), differs


def _echo_counts(index: ReferIndex, name: str, split_by: str, echo: Callable[[str], None]) -> bool:
    """Print the counts table of one refs file; True if a count differs from the official one."""
    official = OFFICIAL_COUNTS.get((name, split_by), {})
    generalized = name in GENERALIZED
    header = ["refs / official", "images / official",
              "expressions / official" if generalized else "sentences / official"]
    header += ["no-target", "multi-target"] if generalized else []
    echo(f"  {'split':<6} " + " ".join(f"{h:>{CELL_WIDTH}}" for h in header))
    found = {s: (*counts, *index.target_counts[s]) if generalized else counts for s, counts in index.counts.items()}
    any_differs = False
    for split, row in found.items():
        approx = {k for k in range(3) if (name, split_by, split, k) in APPROXIMATE}
        line, differs = _table_row(split, row, official.get(split, ()), approx)
        echo(line)
        any_differs |= differs
    total = OFFICIAL_TOTAL_SENTENCES.get((name, split_by))
    if total is not None:  # the splits partition the file's refs, so their counts add up
        line, differs = _table_row("total", [sum(col) for col in zip(*found.values())], (None, None, total), ())
        echo(line)
        any_differs |= differs
    for split, n in index.sentenceless_refs.items():
        if n:
            echo(f"  note: {n} {split} refs have no sentences and give no samples")
    for other, n in sorted(index.other_splits.items()):
        echo(f"  note: {n} refs of split {other!r}, not a {split_by} split, are not used")
    return any_differs


def check_root(root: str | Path, dataset: str | None = None, split_by: str | None = None,
               image_root: str | Path | None = None, progress: bool = True,
               echo: Callable[[str], None] = print) -> list[str]:
    """Check a refer-format data root; print a report through ``echo`` and return the problems.

    Args:
        dataset: one of refcoco, refcoco+, refcocog, grefcoco; None = every one whose folder exists.
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
        split_bys = [split_by] if split_by else [s for s in SPLIT_BYS[name]
                                                 if find_refs_file(ref_dir, name, s).is_file()]
        if not split_bys:
            names = (n for s in SPLIT_BYS[name] for n in refs_file_names(name, s))
            problems.append(f"{ref_dir} has no refs file ({', '.join(names)})")
            continue
        for sb in split_bys:
            echo(f"{name}/{sb}  ({find_refs_file(ref_dir, name, sb)})")
            try:
                index = read_refer(ref_dir, sb, SPLITS[sb], dataset=name)
            except (OSError, ReferError) as e:
                problems.append(str(e))
                echo(f"  unreadable: {e}")
                continue
            problems.extend(index.problems)
            any_differs |= _echo_counts(index, name, sb, echo)

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
