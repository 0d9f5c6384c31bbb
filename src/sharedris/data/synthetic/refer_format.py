"""Write synthetic scenes in the RefCOCO or gRefCOCO refer layout, so the refer loader can be tested without them."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sharedris.data.refer import NO_TARGET_ANN_ID
from sharedris.data.synthetic.dataset import AUX_TAG, SyntheticRefScenes
from sharedris.data.synthetic.families import FAMILIES, GENERAL_FAMILIES
from sharedris.data.synthetic.geometry import SHAPES

# Layout -> its default families: refcoco refs have exactly one target.
LAYOUTS: dict[str, tuple[str, ...]] = {"refcoco": FAMILIES, "grefcoco": GENERAL_FAMILIES}

def write_refer_format(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    size: int = 160,
    seed: int = 0,
    families: Sequence[str] | None = None,
    layout: str = "refcoco",
) -> Path:
    """Write synthetic scenes in a refer layout (docs/reference.md) and return ``<root>/<layout>``.

    ``layout="refcoco"`` writes ``refcoco/instances.json`` and ``refcoco/refs(unc).p`` (pickle
    protocol 2, builtins only) for the four target families (the default ``families``); a ref's
    ``ann_id`` and ``category_id`` are single ids. ``layout="grefcoco"`` writes
    ``grefcoco/instances.json`` and ``grefcoco/grefs(unc).json`` for any families (default: all of
    ``GENERAL_FAMILIES``); ``ann_id`` and ``category_id`` are lists (``[-1]`` with ``no_target: true``
    when the expression refers to nothing). Both write ``images/train2014/COCO_train2014_%012d.jpg``.
    ``splits`` maps split name to number of samples (default train 8, val/testA/testB 4). Each
    sample is one image whose objects are all annotations (polygon segmentation, bbox of the
    polygon, area = pixels of the rasterised polygon, category = shape) and whose expression is
    one ref with 1 or 2 sentences (distinct phrasings; ``raw`` sometimes capitalised, ``sent``
    lower case).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    families = tuple(families) if families is not None else LAYOUTS[layout]
    if layout == "refcoco" and not set(families) <= set(FAMILIES):
        raise ValueError(f"the refcoco layout holds one target per ref, so only the families {FAMILIES}; "
                         "write no_target and multi_target with layout='grefcoco'")
    splits = dict(splits) if splits is not None else {"train": 8, "val": 4, "testA": 4, "testB": 4}
    root = Path(root)
    ref_dir, image_dir = root / layout, root / "images" / "train2014"
    ref_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    # Sentence count and capitalisation only; split code 0 belongs to no split, so the stream is new.
    rng = np.random.default_rng([0, seed, 0, AUX_TAG])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    sent_id = 0
    for split, count in splits.items():
        dataset = SyntheticRefScenes(split, size=size, length=count, seed=seed, families=families)
        for sample in (dataset[i] for i in range(count)):
            image_id = len(images) + 1
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            sample["image"].save(image_dir / file_name, quality=95)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            first_ann = len(annotations) + 1
            annotations += [_annotation(first_ann + k, image_id, obj) for k, obj in enumerate(sample["objects"])]
            sentences = []
            for text in sample["texts"][: int(rng.integers(1, 3))]:
                sent_id += 1
                raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
                sent = text.lower()
                sentences.append({"sent_id": sent_id, "tokens": sent.split(), "raw": raw, "sent": sent})
            ref = _ref(layout, len(refs) + 1, image_id, split, sample, first_ann, sentences)
            refs.append(ref)
    instances = {
        "info": {"description": "sharedris synthetic referring scenes", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
    }
    (ref_dir / "instances.json").write_text(json.dumps(instances))
    if layout == "refcoco":
        with open(ref_dir / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    else:
        (ref_dir / "grefs(unc).json").write_text(json.dumps(refs))
    return ref_dir


def _annotation(ann_id: int, image_id: int, obj: dict[str, Any]) -> dict[str, Any]:
    """A COCO annotation of one drawn object: its polygon, the polygon's box, its pixel area, its shape."""
    xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
    return {
        "id": ann_id,
        "image_id": image_id,
        "segmentation": [obj["polygon"]],
        "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
        "area": float(obj["area"]),
        "category_id": SHAPES.index(obj["shape"]) + 1,
        "iscrowd": 0,
    }


def _ref(layout: str, ref_id: int, image_id: int, split: str, sample: dict[str, Any], first_ann: int,
         sentences: list[dict[str, Any]]) -> dict[str, Any]:
    """The ref of one sample: single ids (refcoco layout) or lists, [-1] for no target (grefcoco)."""
    ann_ids = [first_ann + t for t in sample["targets"]]
    category_ids = [SHAPES.index(sample["objects"][t]["shape"]) + 1 for t in sample["targets"]]
    ref: dict[str, Any] = {"ref_id": ref_id}
    if layout == "refcoco":
        ref.update(ann_id=ann_ids[0], image_id=image_id, split=split, category_id=category_ids[0])
    else:
        ref.update(ann_id=ann_ids or [NO_TARGET_ANN_ID], image_id=image_id, split=split,
                   category_id=category_ids or [NO_TARGET_ANN_ID], no_target=not ann_ids)
    ref.update(sent_ids=[s["sent_id"] for s in sentences],
               file_name=f"COCO_train2014_{image_id:012d}_{ref_id}.jpg", sentences=sentences)
    return ref
