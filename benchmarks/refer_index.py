"""Time and memory of building the RefCOCO index on annotation files of the real dataset's size.

    python benchmarks/refer_index.py [--keep DIR]

Writes a RefCOCO-sized ``refcoco/instances.json`` + ``refs(unc).p`` (20,000 images, 200,000
polygon annotations, 50,000 refs, ~142,000 sentences; no image files: the index never opens
images) into a temporary folder, then builds ``RefDataset`` for each split in a fresh child
process and reports its wall time and the child's peak RSS (``resource.getrusage``). The
baseline row is a child that only imports ``sharedris.data.refer``, so index cost = row - baseline.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPLITS = {"train": 42404, "val": 3811, "testA": 1975, "testB": 1810}  # refcoco/unc refs
NUM_IMAGES, NUM_ANNOTATIONS, NUM_SENTENCES = 20000, 200000, 142210
WORDS = "man woman left right red blue shirt guy chair table the on in front of behind small big white dog".split()


def _polygon(rng: np.random.Generator, w: int, h: int) -> list[float]:
    # COCO-like: one polygon of 8-60 points, coordinates with 2 decimals.
    n = int(rng.integers(8, 61))
    cx, cy, r = rng.uniform(50, w - 50), rng.uniform(50, h - 50), rng.uniform(10, 45)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.6, 1.0, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    return [round(float(v), 2) for v in pts.ravel()]


def write_files(root: Path, seed: int = 0) -> dict[str, float]:
    """Write the synthetic annotation files under ``root/refcoco``; return their sizes in MB."""
    rng = np.random.default_rng(seed)
    ref_dir = root / "refcoco"
    ref_dir.mkdir(parents=True, exist_ok=True)
    sizes = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)], size=NUM_IMAGES)
    images = [{"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "width": int(w), "height": int(h),
               "license": 1, "coco_url": "", "flickr_url": "", "date_captured": ""}
              for i, (w, h) in enumerate(sizes)]
    annotations = []
    for a in range(NUM_ANNOTATIONS):
        image_id = a % NUM_IMAGES + 1
        w, h = (int(v) for v in sizes[image_id - 1])
        poly = _polygon(rng, w, h)
        xs, ys = poly[0::2], poly[1::2]
        annotations.append({"id": a + 1, "image_id": image_id, "segmentation": [poly], "area": 1000.0,
                            "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                            "category_id": int(rng.integers(1, 91)), "iscrowd": 0})
    instances = {"info": {}, "licenses": [], "images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in range(1, 91)]}
    (ref_dir / "instances.json").write_text(json.dumps(instances))
    del instances, annotations

    refs, sent_id = [], 0
    total_refs = sum(SPLITS.values())
    per_ref = np.full(total_refs, NUM_SENTENCES // total_refs)
    per_ref[rng.choice(total_refs, NUM_SENTENCES - int(per_ref.sum()), replace=False)] += 1
    split_of = [s for s, n in SPLITS.items() for _ in range(n)]
    for r in range(total_refs):
        ann_id = int(rng.integers(1, NUM_ANNOTATIONS + 1))
        image_id = (ann_id - 1) % NUM_IMAGES + 1
        sentences = []
        for _ in range(int(per_ref[r])):
            sent_id += 1
            tokens = [WORDS[int(k)] for k in rng.integers(0, len(WORDS), int(rng.integers(2, 9)))]
            sentences.append({"sent_id": sent_id, "tokens": tokens, "raw": " ".join(tokens).capitalize(),
                              "sent": " ".join(tokens)})
        refs.append({"ref_id": r + 1, "ann_id": ann_id, "image_id": image_id, "split": split_of[r],
                     "category_id": 1, "sent_ids": [s["sent_id"] for s in sentences],
                     "file_name": f"COCO_train2014_{image_id:012d}_{r + 1}.jpg", "sentences": sentences})
    with open(ref_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {p.name: p.stat().st_size / 1e6 for p in ref_dir.iterdir()}


def _child(root: str, split: str) -> None:
    from sharedris.data.refer import RefDataset  # imported by the baseline too

    if split != "none":
        start = time.perf_counter()
        ds = RefDataset(root, "refcoco", split=split)
        elapsed = time.perf_counter() - start
        n = len(ds)
    else:
        elapsed, n = 0.0, 0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"split": split, "seconds": elapsed, "sentences": n, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="write the files here (and keep them) instead of a temp dir")
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "SPLIT"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    if args.write:
        print(json.dumps(write_files(Path(args.write))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        # Written by a child: Linux keeps a process's peak RSS across fork+exec, so a parent that
        # had built the files would lend its peak to every measuring child.
        out = subprocess.run([sys.executable, __file__, "--write", str(root)], check=True,
                             capture_output=True, text=True).stdout
        sizes = json.loads(out.strip().splitlines()[-1])
        print(f"wrote {', '.join(f'{k} {v:.0f} MB' for k, v in sorted(sizes.items()))} "
              f"in {time.perf_counter() - start:.0f} s")
        print(f"{'split':<8} {'sentences':>10} {'build s':>8} {'peak RSS MB':>12}")
        for split in ["none", *SPLITS]:
            out = subprocess.run([sys.executable, __file__, "--child", str(root), split], check=True,
                                 capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            label = "baseline" if split == "none" else split
            print(f"{label:<8} {row['sentences']:>10,} {row['seconds']:>8.2f} {row['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
