"""Write synthetic scenes in the RefCOCO refer layout, so the refer loader can be tested without RefCOCO."""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sharedris.data.synthetic.dataset import AUX_TAG, SyntheticRefScenes
from sharedris.data.synthetic.families import FAMILIES
from sharedris.data.synthetic.geometry import SHAPES


def write_refer_format(
    root: str | Path,
    splits: Mapping[str, int] | None = None,
    size: int = 160,
    seed: int = 0,
    families: Sequence[str] = FAMILIES,
) -> Path:
    """Write synthetic scenes in the RefCOCO refer layout (docs/reference.md) and return ``<root>/refcoco``.

    Writes ``refcoco/instances.json``, ``refcoco/refs(unc).p`` (pickle protocol 2, builtins only)
    and ``images/train2014/COCO_train2014_%012d.jpg``. ``splits`` maps split name to number of
    samples (default train 8, val/testA/testB 4). Each sample is one image whose objects are all
    annotations (polygon segmentation, bbox of the polygon, area = pixels of the rasterised
    polygon, category = shape) and whose target is one ref with 1 or 2 sentences (distinct
    phrasings; ``raw`` sometimes capitalised, ``sent`` lower case).
    """
    splits = dict(splits) if splits is not None else {"train": 8, "val": 4, "testA": 4, "testB": 4}
    root = Path(root)
    ref_dir, image_dir = root / "refcoco", root / "images" / "train2014"
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
            for k, obj in enumerate(sample["objects"]):
                xs, ys = obj["polygon"][0::2], obj["polygon"][1::2]
                annotations.append({
                    "id": first_ann + k,
                    "image_id": image_id,
                    "segmentation": [obj["polygon"]],
                    "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                    "area": float(obj["area"]),
                    "category_id": SHAPES.index(obj["shape"]) + 1,
                    "iscrowd": 0,
                })
            sentences = []
            for text in sample["texts"][: int(rng.integers(1, 3))]:
                sent_id += 1
                raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
                sent = text.lower()
                sentences.append({"sent_id": sent_id, "tokens": sent.split(), "raw": raw, "sent": sent})
            ref_id = len(refs) + 1
            refs.append({
                "ref_id": ref_id,
                "ann_id": first_ann + sample["target"],
                "image_id": image_id,
                "split": split,
                "category_id": SHAPES.index(sample["objects"][sample["target"]]["shape"]) + 1,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
                "sentences": sentences,
            })
    instances = {
        "info": {"description": "sharedris synthetic referring scenes", "seed": seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)],
    }
    (ref_dir / "instances.json").write_text(json.dumps(instances))
    with open(ref_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return ref_dir
