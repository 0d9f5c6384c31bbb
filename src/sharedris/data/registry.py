"""Datasets by name: a plain dict from name to a builder ``(DataConfig, split, train) -> Source``.

``build_source`` is how training and ``sharedris eval`` open data; adding a dataset is one entry in
:data:`DATASETS`. Refer-format readers are imported only when used (they need pycocotools).
"""

from __future__ import annotations

from typing import Callable

from sharedris.data.config import DataConfig
from sharedris.data.sample import Source


HELDOUT_FOR_EVALUATION_ONLY = ("the held-out renderer is for evaluation only; train and select checkpoints on "
                               "the generator's scenes (data.synthetic_renderer=generator)")


def _synthetic(cfg: DataConfig, split: str, train: bool) -> Source:
    """The generator's scenes of ``split``, or (``synthetic_renderer="heldout"``, never for training)
    the held-out renderer's variant ``synthetic_heldout_variant``, which has no splits."""
    from sharedris.data.synthetic import FAMILIES, GENERAL_FAMILIES, MULTI_TARGET, SyntheticRefScenes
    from sharedris.data.synthetic.compose import STRETCH
    from sharedris.data.synthetic.families import RELATION_CANDIDATES

    if cfg.synthetic_renderer == "heldout":
        if train:
            raise ValueError(HELDOUT_FOR_EVALUATION_ONLY)
        from sharedris.data.heldout import HeldoutScenes

        return HeldoutScenes(cfg.synthetic_heldout_variant, length=cfg.synthetic_eval_size, seed=cfg.seed)
    return SyntheticRefScenes(
        split=split,
        size=cfg.synthetic_image_size,
        length=cfg.synthetic_train_size if train else cfg.synthetic_eval_size,
        seed=cfg.synthetic_train_seed if train and cfg.synthetic_train_seed is not None else cfg.seed,
        families=cfg.synthetic_train_families if train else GENERAL_FAMILIES,
        shuffle_texts=cfg.shuffle_texts and train,
        fresh_epochs=cfg.synthetic_fresh_epochs and train,
        balanced=not train,  # every family alike in evaluation
        styles=cfg.synthetic_styles,
        # evaluation: "nothing matches" expressions borrow from every family that can be absent
        no_target_phrasings=cfg.synthetic_no_target_phrasings if train else
        FAMILIES + ((MULTI_TARGET,) if cfg.synthetic_world == "varied" else ()),
        world=cfg.synthetic_world,
        stretch=cfg.synthetic_stretch if train else STRETCH,
        relation_candidates=cfg.synthetic_relation_candidates if train else RELATION_CANDIDATES,
    )


def _refer(dataset: str) -> Callable[[DataConfig, str, bool], Source]:
    def build(cfg: DataConfig, split: str, train: bool) -> Source:
        from sharedris.data.refer import RefDataset, data_root

        return RefDataset(data_root(cfg.root), dataset=dataset, split_by=cfg.split_by, split=split,
                          text_field=cfg.text_field)

    return build


DATASETS: dict[str, Callable[[DataConfig, str, bool], Source]] = {
    "synthetic": _synthetic,
    "refcoco": _refer("refcoco"),
    "refcoco+": _refer("refcoco+"),
    "refcocog": _refer("refcocog"),
    "grefcoco": _refer("grefcoco"),  # no-target expressions give empty masks; GRES metrics in sharedris.metrics
}


def dataset_names() -> list[str]:
    """Names accepted by ``DataConfig.dataset`` and ``sharedris eval --dataset``."""
    return list(DATASETS)


def build_source(cfg: DataConfig, split: str, train: bool) -> Source:
    """The dataset named by ``cfg`` for ``split``. ``train`` selects the training length and controls."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {cfg.dataset!r}; available: {', '.join(DATASETS)}")
    return DATASETS[cfg.dataset](cfg, split, train)
