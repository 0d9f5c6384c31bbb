"""Model-ready samples from any referring dataset, and the builder that picks the dataset.

A *source* is anything indexable whose items are dicts with ``image`` (PIL RGB), ``mask`` (bool
HxW at the image's size) and ``text``; optionally ``family`` (a breakdown key for evaluation).
A training source may also have ``set_epoch(epoch)``, which the training loop calls before each
epoch (the synthetic scenes use it to serve new scenes every epoch).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sharedris.config import DataConfig
from sharedris.data.transforms import image_to_tensor, mask_to_tensor

REFER_DATASETS = ("refcoco", "refcoco+", "refcocog")  # read by sharedris.data.refer (imported lazily)


class Source(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class RISSamples(Dataset):
    """Turn a source into tensors at the model's size.

    Items: ``image`` (3, S, S) normalized, ``mask`` (1, S, S) float, ``text`` (str), ``family``
    (str, "" if the source has none), ``index`` (int) and, with ``keep_original_mask``,
    ``orig_mask`` (bool HxW at the original size, for scoring).
    """

    def __init__(self, source: Source, image_size: int, mean: Sequence[float], std: Sequence[float],
                 keep_original_mask: bool = False) -> None:
        self.source = source
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.keep_original_mask = keep_original_mask

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.source[index]
        item = {
            "image": image_to_tensor(s["image"], self.image_size, self.mean, self.std),
            "mask": mask_to_tensor(s["mask"], self.image_size),
            "text": s["text"],
            "family": s.get("family", ""),
            "index": index,
        }
        if self.keep_original_mask:
            item["orig_mask"] = np.asarray(s["mask"], dtype=bool)
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep texts, families and original masks as lists."""
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "text": [it["text"] for it in items],
        "family": [it["family"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    if "orig_mask" in items[0]:
        batch["orig_mask"] = [it["orig_mask"] for it in items]
    return batch


def build_source(cfg: DataConfig, split: str, train: bool) -> Source:
    """The dataset named by ``cfg`` for ``split``. ``train`` selects the training length/controls."""
    if cfg.dataset == "synthetic":
        from sharedris.data.synthetic import FAMILIES, SyntheticRefScenes

        return SyntheticRefScenes(
            split=split,
            size=cfg.synthetic_image_size,
            length=cfg.synthetic_train_size if train else cfg.synthetic_eval_size,
            seed=cfg.seed,
            families=cfg.synthetic_train_families if train else FAMILIES,
            shuffle_texts=cfg.shuffle_texts and train,
            fresh_epochs=cfg.synthetic_fresh_epochs and train,
        )
    if cfg.dataset in REFER_DATASETS:
        from sharedris.data.refer import RefDataset, data_root

        return RefDataset(data_root(cfg.root), dataset=cfg.dataset, split_by=cfg.split_by, split=split,
                          text_field=cfg.text_field)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; available: synthetic, {', '.join(REFER_DATASETS)}")

