"""Model-ready tensors from any source of :class:`~sharedris.data.sample.RefSample` items."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sharedris.data.sample import Source
from sharedris.data.transforms import image_to_tensor, mask_to_tensor

MAX_CANDIDATES = 8  # candidate masks per relation item: the referent and up to 7 objects of its shape


class RISSamples(Dataset):
    """Turn a source into tensors at the model's size.

    Items: ``image`` (3, S, S) normalized, ``mask`` (1, S, S) float, ``text`` (str), ``group``
    (str, the sample's breakdown key), ``index`` (int) and, with ``keep_original_mask``,
    ``orig_mask`` (bool HxW at the original size, for scoring). With ``relations`` (training with
    ``decoder.anchor_point`` or ``loss.rank_weight``), where the source names a relation's anchor
    (synthetic scenes: their ``anchor``, ``target``, ``objects`` and ``labels``): ``anchor`` (1, S, S)
    float, the mask of the object the relation is measured from; ``has_anchor`` (bool); and
    ``candidates`` (:data:`MAX_CANDIDATES`, S, S) bool, the masks of the objects of the referent's
    shape, the referent first (the others in the source's order, as many as fit), empty masks
    after them. Sources without anchors give empty masks and False.
    """

    def __init__(self, source: Source, image_size: int, mean: Sequence[float], std: Sequence[float],
                 keep_original_mask: bool = False, relations: bool = False) -> None:
        self.source = source
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.keep_original_mask = keep_original_mask
        self.relations = relations

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
        if self.relations:
            item.update(self._relation(s))
        return item

    def _relation(self, s: Any) -> dict[str, Any]:
        """The ``anchor``, ``has_anchor`` and ``candidates`` items of source sample ``s``."""
        size, anchor = self.image_size, s.get("anchor")
        candidates = torch.zeros(MAX_CANDIDATES, size, size, dtype=torch.bool)
        if anchor is None:
            return {"anchor": torch.zeros(1, size, size), "has_anchor": False, "candidates": candidates}
        labels, objects, referent = np.asarray(s["labels"]), s["objects"], s["target"]
        others = [k for k, o in enumerate(objects) if o["shape"] == objects[referent]["shape"] and k != referent]
        for slot, k in enumerate([referent, *others][:MAX_CANDIDATES]):
            candidates[slot] = mask_to_tensor(labels == k + 1, size)[0] > 0.5
        return {"anchor": mask_to_tensor(labels == anchor + 1, size), "has_anchor": True, "candidates": candidates}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (and each relation item: ``anchors``, ``has_anchor``, ``candidates``, where items have
    them); keep texts, groups and original masks as lists."""
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
        batch["anchors"] = torch.stack([it["anchor"] for it in items])
        batch["has_anchor"] = torch.tensor([it["has_anchor"] for it in items])
        batch["candidates"] = torch.stack([it["candidates"] for it in items])
    return batch
