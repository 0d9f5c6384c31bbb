"""Helper for test_train.py: evaluate two fixed models on 13 synthetic samples.

Run as ``torchrun --nproc_per_node=2 tests/_dist_eval.py OUT.json`` (rank 0 writes the results), or
import :func:`evaluate_fixed_models` for the single-process reference.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from _tiny_model import TINY_MODEL
from torch import Tensor, nn

from sharedris.data.datasets import RISSamples
from sharedris.data.synthetic import SyntheticRefScenes
from sharedris.evaluate import evaluate
from sharedris.modeling.config import ModelConfig
from sharedris.modeling.registry import build_model, model_config
from sharedris.modeling.segmenter import SegmenterOutput

NUM_SAMPLES = 13  # odd: the two ranks' shards differ in size


class PartialOracle(nn.Module):
    """The ground-truth mask with a sample-dependent share of its rows erased.

    A random model's IoUs all sit near 0, which leaves every P@X at 0; these spread over [0, 1].
    Images are recognised by their bytes, so it works on any shard of the samples.
    """

    def __init__(self, samples: RISSamples, config: ModelConfig) -> None:
        super().__init__()
        self.config, self.tokenizer_file = config, None
        self.logits: dict[bytes, Tensor] = {}
        for i in range(len(samples)):
            item = samples[i]
            mask = item["mask"][0] > 0.5  # (S, S)
            rows = mask.any(dim=1).nonzero().flatten()
            erased = rows[: len(rows) * (i % 6) // 6]
            mask[erased] = False
            self.logits[item["image"].numpy().tobytes()] = torch.where(mask, 10.0, -10.0)[None]  # (1, S, S)

    def forward(self, image: Tensor, text_ids: Tensor, text_padding_mask: Tensor | None = None) -> SegmenterOutput:
        return SegmenterOutput(torch.stack([self.logits[im.numpy().tobytes()] for im in image]))  # (B, 1, S, S)


def evaluate_fixed_models() -> dict[str, Any]:
    """Results of a fixed-seed tiny model and of :class:`PartialOracle` (torch.distributed if initialised)."""
    cfg = model_config("sharedris_tiny", **TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg)
    source = SyntheticRefScenes("val", size=cfg.image_size, length=NUM_SAMPLES, seed=0)
    oracle = PartialOracle(RISSamples(source, cfg.image_size, cfg.mean, cfg.std), cfg)
    # batch_size 1: each sample's logits are then computed the same way on every rank and in the
    # reference, so the comparison tests the sharding and the reduction, not float kernels.
    # runtime torch: the oracle answers from a dict of tensors, which no conversion can hold
    return {name: evaluate(m, source, batch_size=1, progress=False, runtime="torch")
            for name, m in (("tiny_model", model), ("oracle", oracle))}


def main(out: str) -> None:
    from sharedris.distributed import cleanup_distributed, init_distributed

    info = init_distributed("cpu")
    try:
        results = evaluate_fixed_models()
        if info.is_main:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
