"""Stem pre-training: the image stem alone learns to classify objects before the referring loss.

Why (docs/training.md, "What was tried"): ``sharedris_tiny`` trained from scratch with the
referring loss alone never made its features encode shape (a linear probe reads 22-24% shape
accuracy, chance 17%), so "the red square" picked every red object. The same stem with a linear
head on the scenes' own object labels learns shape in a few hundred steps, and the referring model
built on that stem learns much faster.

The stage: for each object of ``scenes_per_step`` consecutive training scenes, the stem's feature at
the patch under the object's centre goes through a linear head, with cross-entropy against the
object's category; AdamW over the stem and the head. The head is thrown away afterwards. Its
initial weights come from the global RNG, whose state is restored afterwards, so the training
that follows draws the same random numbers as without the stage.

It uses only the training data's own annotations: source items must carry ``objects`` (each
with ``centre`` in image pixels and ``category``), and the source must name its categories in
``object_classes``.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharedris.progress import progress
from sharedris.train.config import StemPretrainConfig
from sharedris.data.sample import Source
from sharedris.data.transforms import image_to_tensor


def object_batch(source: Source, indices: Sequence[int], image_size: int, mean: Sequence[float],
                 std: Sequence[float], grid: int) -> tuple[Tensor, Tensor, Tensor]:
    """Images (B, 3, S, S), each object's (image, row, col) cell on a ``grid`` x ``grid`` feature map
    (N, 3) and its category index (N,)."""
    classes = source.object_classes
    images, cells, labels = [], [], []
    for b, index in enumerate(indices):
        item = source[index]
        width, height = item["image"].size
        images.append(image_to_tensor(item["image"], image_size, mean, std))
        for obj in item["objects"]:
            x, y = obj["centre"]
            cells.append((b, min(int(y * grid / height), grid - 1), min(int(x * grid / width), grid - 1)))
            labels.append(classes.index(obj["category"]))
    return torch.stack(images), torch.tensor(cells, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def pretrain_stem(stem: nn.Module, source: Source, cfg: StemPretrainConfig, *, image_size: int,
                  mean: Sequence[float], std: Sequence[float], device: torch.device,
                  show_progress: bool = True) -> tuple[nn.Linear, dict[str, Any]]:
    """Train ``stem`` (image (B, 3, S, S) -> features (B, D, h, w)) in place for ``cfg.steps`` steps.

    Returns the fitted head and a summary: the loss and accuracy of every step, the wall time.
    """
    classes = getattr(source, "object_classes", None)
    if not classes:
        raise ValueError(f"stem_pretrain.steps={cfg.steps} needs per-object category labels, which this "
                         "training data does not provide (only the synthetic scenes do); set stem_pretrain.steps=0")
    if cfg.scenes_per_step < 1 or cfg.steps < 0:
        raise ValueError(f"stem_pretrain needs steps >= 0 and scenes_per_step >= 1, got {cfg.steps} and "
                         f"{cfg.scenes_per_step}")
    with torch.no_grad():
        channels, grid = stem(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:3]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        head = nn.Linear(channels, len(classes)).to(device)
        optimizer = torch.optim.AdamW([*stem.parameters(), *head.parameters()], lr=cfg.lr)
        stem.train()
        for step in progress(range(1, cfg.steps + 1), desc="stem", disable=not show_progress, dynamic_ncols=True):
            first = step * cfg.scenes_per_step  # step s reads scenes s*n ... s*n + n - 1 (cycling)
            indices = [(first + i) % len(source) for i in range(cfg.scenes_per_step)]
            images, cells, labels = object_batch(source, indices, image_size, mean, std, grid)
            images, cells, labels = images.to(device), cells.to(device), labels.to(device)
            features = stem(images)[cells[:, 0], :, cells[:, 1], cells[:, 2]]  # (N, D)
            logits = head(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append({"step": step, "loss": loss.item(),
                            "accuracy": (logits.argmax(1) == labels).float().mean().item()})
    return head, {"steps": cfg.steps, "history": history, "elapsed_s": time.perf_counter() - start}
