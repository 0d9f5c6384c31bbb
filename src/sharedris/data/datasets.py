"""Model-ready tensors from any source of :class:`~sharedris.data.sample.RefSample` items."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sharedris.data.sample import Source
from sharedris.data.transforms import image_to_tensor, mask_to_tensor


class RISSamples(Dataset):
    """Turn a source into tensors at the model's size.

    Items: ``image`` (3, S, S) normalized, ``mask`` (1, S, S) float, ``text`` (str), ``group``
    (str, the sample's breakdown key), ``index`` (int) and, with ``keep_original_mask``,
    ``orig_mask`` (bool HxW at the original size, for scoring). With ``anchors`` (training a model
    with ``decoder.anchor_point``): ``anchor`` (1, S, S) float, the mask of the object a relation is
    measured from, where the source names one (synthetic scenes: their ``anchor`` and ``labels``),
    and ``has_anchor`` (bool); sources without anchors give an empty mask and False.
    """

    def __init__(self, source: Source, image_size: int, mean: Sequence[float], std: Sequence[float],
                 keep_original_mask: bool = False, anchors: bool = False) -> None:
        self.source = source
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.keep_original_mask = keep_original_mask
        self.anchors = anchors

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.source[index]
        item = {
            "image": image_to_tensor(s["image"], self.image_size, self.mean, self.std),
            "mask": mask_to_tensor(s["mask"], self.image_size),
            "text": s["text"],
            "group": s["group"],
            "index": index,
        }
        if self.keep_original_mask:
            item["orig_mask"] = np.asarray(s["mask"], dtype=bool)
        if self.anchors:
            anchor = s.get("anchor")
            mask = np.asarray(s["labels"]) == anchor + 1 if anchor is not None else np.zeros(np.shape(s["mask"]), bool)
            item["anchor"] = mask_to_tensor(mask, self.image_size)
            item["has_anchor"] = anchor is not None
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (anchor masks and flags too, where items have them); keep texts, groups and original masks as lists."""
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "text": [it["text"] for it in items],
        "group": [it["group"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "orig_mask" in items[0]:
        batch["orig_mask"] = [it["orig_mask"] for it in items]
    if "anchor" in items[0]:
        batch["anchor"] = torch.stack([it["anchor"] for it in items])
        batch["has_anchor"] = torch.tensor([it["has_anchor"] for it in items])
    return batch
