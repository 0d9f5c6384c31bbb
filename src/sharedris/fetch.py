"""What ``sharedris fetch`` downloads, from where, and how it is laid out on disk.

Sources (each URL's origin is noted next to it):

- BEiT-3 checkpoints and ``beit3.spm``: the "Download Checkpoints" and "Text Tokenizer" sections of
  ``beit3/README.md`` in github.com/microsoft/unilm (commit 768a3c8; the links moved there from an
  Azure blob to GitHub release assets in 2024).
- refcoco.zip, refcoco+.zip, refcocog.zip: the "Download" section of github.com/lichengunc/refer's
  README (bvisionweb1.cs.unc.edu). That README itself says the web server is broken and points to
  refer issue #14 (comment 1258318183), whose Internet Archive copies are the fallback URLs below.
- train2014.zip: the COCO download page (https://cocodataset.org/#download), images.cocodataset.org.
- gRefCOCO: github.com/henghuiding/gRefCOCO links only a Google Drive folder and a Hugging Face
  dataset page, neither a stable direct file URL, so it is a manual step (:data:`GREFCOCO_MANUAL`).

None of these sources publishes a SHA-256, so every ``sha256`` below is None and the download
records the digest it saw (``<file>.sha256``); fill a value in once a copy has been verified.
"""

from __future__ import annotations

import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from sharedris.checkpoint import home_dir, writable_dir
from sharedris.data.refer import SPLIT_BYS
from sharedris.download import DownloadError, Remote, download

_BEIT3 = "https://github.com/addf400/files/releases/download/beit3/"
_REFER = "https://bvisionweb1.cs.unc.edu/licheng/referit/data/"
_WAYBACK = "https://web.archive.org/web/{stamp}/" + _REFER

REMOTES: dict[str, Remote] = {r.name: r for r in (
    Remote("beit3_base_patch16_224.pth", (_BEIT3 + "beit3_base_patch16_224.pth",)),
    Remote("beit3_large_patch16_224.pth", (_BEIT3 + "beit3_large_patch16_224.pth",)),
    Remote("beit3.spm", (_BEIT3 + "beit3.spm",)),
    Remote("refcoco.zip", (_REFER + "refcoco.zip", _WAYBACK.format(stamp="20220413011718") + "refcoco.zip")),
    Remote("refcoco+.zip", (_REFER + "refcoco+.zip", _WAYBACK.format(stamp="20220413011656") + "refcoco+.zip")),
    Remote("refcocog.zip", (_REFER + "refcocog.zip", _WAYBACK.format(stamp="20220413012904") + "refcocog.zip")),
    Remote("train2014.zip", ("http://images.cocodataset.org/zips/train2014.zip",)),
)}

WEIGHTS: dict[str, str] = {"beit3_base": "beit3_base_patch16_224.pth", "beit3_large": "beit3_large_patch16_224.pth"}
TOKENIZER = "beit3.spm"
DATASETS: tuple[str, ...] = tuple(SPLIT_BYS)  # grefcoco included
IMAGES = "train2014.zip"

GREFCOCO_FILES: tuple[str, ...] = ("grefs(unc).json", "instances.json")
GREFCOCO_MANUAL = (
    "gRefCOCO has no stable direct download. Get grefs(unc).json and instances.json from the Google Drive "
    "folder or the Hugging Face dataset (FudanCVL/gRefCOCO) linked in https://github.com/henghuiding/gRefCOCO "
    "and put them here:\n"
    "  {root}/grefcoco/grefs(unc).json\n"
    "  {root}/grefcoco/instances.json\n"
    "  {root}/images/train2014/COCO_train2014_%012d.jpg   (COCO train2014, fetched by this command)"
)


def cache_dir(path: str | Path | None = None) -> Path:
    """Where weights go: ``path``, else ``$SHAREDRIS_HOME``, else ``~/.cache/sharedris``."""
    return home_dir() if path is None else Path(path).expanduser()


def required_files(dataset: str) -> tuple[str, ...]:
    """Files the reader needs in ``<root>/<dataset>/``."""
    if dataset == "grefcoco":
        return GREFCOCO_FILES
    return ("instances.json", *(f"refs({s}).p" for s in SPLIT_BYS[dataset]))


def resolve_remotes(names: Sequence[str], overrides: Sequence[str] = ()) -> dict[str, Remote]:
    """The :data:`REMOTES` entries for ``names``, with ``NAME=URL`` overrides as their only URL.

    Raises:
        DownloadError: an override is not ``NAME=URL`` or names a file this command does not fetch.
    """
    remotes = {name: REMOTES[name] for name in names}
    for item in overrides:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise DownloadError(f"--url expects NAME=URL, got {item!r}")
        if name not in remotes:
            raise DownloadError(f"--url names {name!r}, which this command does not download; "
                                f"valid names: {', '.join(remotes)}")
        remotes[name] = replace(remotes[name], urls=(url,))
    return remotes


def _get(remote: Remote, dest: Path, echo: Callable[[str], None]) -> Path:
    try:
        return download(remote, dest, echo=echo)
    except DownloadError as e:
        raise DownloadError(f"{e}; a mirror can be given with --url {remote.name}=URL") from None


def fetch_weights(model: str, directory: Path, overrides: Sequence[str] = (),
                  echo: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Download the BEiT-3 checkpoint of ``model`` (a :data:`WEIGHTS` key) and ``beit3.spm``.

    Returns:
        (checkpoint path, SentencePiece model path), both in ``directory``.
    """
    if model not in WEIGHTS:
        raise DownloadError(f"unknown weights {model!r}; valid: {', '.join(WEIGHTS)}")
    remotes = resolve_remotes([WEIGHTS[model], TOKENIZER], overrides)
    writable_dir(directory)
    return _get(remotes[WEIGHTS[model]], directory / WEIGHTS[model], echo), \
        _get(remotes[TOKENIZER], directory / TOKENIZER, echo)


def _safe_extract(archive: Path, staging: Path) -> None:
    """Unzip ``archive`` into ``staging``, refusing members that would land outside it."""
    try:
        with zipfile.ZipFile(archive) as zf:
            base = staging.resolve()
            for member in zf.namelist():
                if not (base / member).resolve().is_relative_to(base):
                    raise DownloadError(f"{archive} holds {member!r}, a path outside its folder; not unpacked")
            zf.extractall(staging)
    except zipfile.BadZipFile:
        raise DownloadError(f"{archive} is not a valid zip file; delete it and fetch again") from None


def unpack(archive: Path, top: str, dest: Path, marker: str | None = None) -> None:
    """Unzip ``archive`` and move its folder ``top`` to ``dest`` in one rename once complete.

    The archive is unpacked into a hidden staging folder next to ``dest``, so an interrupted unpack
    never leaves a partial ``dest``. With a ``marker`` file name, an archive without the ``top``
    folder but with ``marker`` at its root (some mirrors zip the files alone) is accepted too.

    Raises:
        DownloadError: the archive is not a zip, escapes its folder, or holds neither layout.
    """
    staging = dest.with_name(f".{dest.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _safe_extract(archive, staging)
        if (staging / top / (marker or "")).exists():
            source = staging / top
        elif marker is not None and (staging / marker).exists():
            source = staging
        else:
            wanted = f"{top}/{marker} or {marker}" if marker else f"a {top}/ folder"
            raise DownloadError(f"{archive} holds no {wanted}; is it the right archive?")
        source.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_archive(remote: Remote, root: Path, top: str, dest: Path, marker: str | None, keep_archives: bool,
                   echo: Callable[[str], None]) -> None:
    """Download and unpack one archive into ``dest`` unless ``dest`` is already there."""
    if dest.is_dir():
        echo(f"{dest} already exists; {remote.name} not fetched")
        return
    archive = _get(remote, writable_dir(root / "downloads") / remote.name, echo)
    echo(f"unpacking {archive} into {dest}")
    unpack(archive, top, dest, marker)
    if not keep_archives:
        archive.unlink()
        archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)


def fetch_data(dataset: str, root: Path, overrides: Sequence[str] = (), skip_images: bool = False,
               keep_archives: bool = False, echo: Callable[[str], None] = print) -> list[str]:
    """Download and lay out one dataset's annotations (and COCO train2014 images) under ``root``.

    Layout: ``<root>/<dataset>/`` (``instances.json``, ``refs(<split_by>).p`` or gRefCOCO's
    ``grefs(unc).json``) and ``<root>/images/train2014/``. Archives are downloaded to
    ``<root>/downloads/`` and deleted after unpacking unless ``keep_archives``. gRefCOCO annotations
    are a manual step, printed through ``echo``.

    Returns:
        Annotation files the reader needs that are still missing (empty when complete).
    """
    if dataset not in DATASETS:
        raise DownloadError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    names = ([] if dataset == "grefcoco" else [f"{dataset}.zip"]) + ([] if skip_images else [IMAGES])
    remotes = resolve_remotes(names, overrides)
    writable_dir(root)
    if dataset == "grefcoco":
        echo(GREFCOCO_MANUAL.format(root=root))
    else:
        _fetch_archive(remotes[f"{dataset}.zip"], root, dataset, root / dataset, "instances.json",
                       keep_archives, echo)
    if not skip_images:
        _fetch_archive(remotes[IMAGES], root, "train2014", writable_dir(root / "images") / "train2014",
                       None, keep_archives, echo)
    return [str(root / dataset / f) for f in required_files(dataset) if not (root / dataset / f).is_file()]
