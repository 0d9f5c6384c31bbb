"""What data a run trains and validates on: :class:`DataConfig` (part of the training config)."""

from __future__ import annotations

from dataclasses import dataclass

from sharedris.data.heldout import VARIANTS
from sharedris.data.synthetic import FAMILIES, WORLDS
from sharedris.data.synthetic.compose import STRETCH
from sharedris.data.synthetic.families import MAX_RELATION_CANDIDATES, RELATION_CANDIDATES

RENDERERS = ("generator", "heldout")


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # a name in sharedris.data.registry.DATASETS
    root: str | None = None  # refer-format root; falls back to $SHAREDRIS_DATA
    split_by: str | None = None  # unc / umd / google; None = the dataset's usual one
    train_split: str = "train"
    val_split: str = "val"  # selection never uses a test split
    text_field: str = "raw"  # refer sentences: "raw" (typed text, what LAVT feeds) or "sent"
    synthetic_image_size: int = 128
    synthetic_train_size: int = 20000
    synthetic_eval_size: int = 1200  # per evaluation split: scene i is of family i % 6, so 200 of each
    # Training scenes only (evaluation always has all six families, GENERAL_FAMILIES, in equal shares):
    # each scene's family is drawn uniformly from this list, so a family listed twice is drawn twice
    # as often. The four target families by default; add no_target and multi_target for generalised
    # referring (empty and union masks).
    synthetic_train_families: tuple[str, ...] = FAMILIES
    # Training scenes only: the target families whose expressions no_target scenes borrow, drawn
    # uniformly from this list (evaluation always borrows from all four alike).
    synthetic_no_target_phrasings: tuple[str, ...] = FAMILIES
    # Background styles drawn per scene, training and evaluation alike (sharedris.data.synthetic.STYLES:
    # texture, plain, gradient, stripes); the texture scenes are the same whichever others are listed.
    synthetic_styles: tuple[str, ...] = ("texture",)
    # How scenes are made (sharedris.data.synthetic.WORLDS): "varied" (independent and constructed
    # layouts, many renderings; ``synthetic_styles`` does not apply) or "flat" (the first recipes').
    synthetic_world: str = "varied"
    # Training scenes of the varied world only: the share of scenes whose shapes are stretched as
    # those of a squashed non-square picture, and the widest such picture's aspect (evaluation
    # splits always draw the world's own, sharedris.data.synthetic.compose.STRETCH).
    synthetic_stretch: tuple[float, float] = STRETCH
    # Training scenes of the varied world only: how many objects of the named shape a constructed
    # relation scene holds, [fewest, most], 2 to 4 (evaluation splits always draw
    # sharedris.data.synthetic.families.RELATION_CANDIDATES, [2, 3]).
    synthetic_relation_candidates: tuple[int, int] = RELATION_CANDIDATES
    synthetic_fresh_epochs: bool = False  # each epoch new training scenes (e*N..e*N+N-1) instead of the same N
    seed: int = 0
    # Training scenes only: their seed, so that a later stage can see scenes no earlier one saw
    # (None = seed; validation and test scenes always follow seed).
    synthetic_train_seed: int | None = None
    shuffle_texts: bool = False  # control experiment: texts permuted across samples
    num_workers: int = 2
    # What draws synthetic evaluation scenes: "generator" (sharedris.data.synthetic, the scenes training
    # sees) or "heldout" (sharedris.data.heldout, an independent renderer, evaluation only: training
    # refuses it) drawing its variant synthetic_heldout_variant, synthetic_eval_size scenes of seed.
    synthetic_renderer: str = "generator"
    synthetic_heldout_variant: str = "few"

    def __post_init__(self) -> None:
        if self.synthetic_world not in WORLDS:
            raise ValueError(f"synthetic_world={self.synthetic_world!r}: choose {' or '.join(WORLDS)}")
        if self.synthetic_renderer not in RENDERERS:
            raise ValueError(f"synthetic_renderer={self.synthetic_renderer!r}: choose {' or '.join(RENDERERS)}")
        if self.synthetic_heldout_variant not in VARIANTS:
            raise ValueError(f"synthetic_heldout_variant={self.synthetic_heldout_variant!r}: choose one of "
                             f"{', '.join(VARIANTS)}")
        share, widest = self.synthetic_stretch
        if not (0 <= share <= 1 and widest >= 1):
            raise ValueError(f"synthetic_stretch={list(self.synthetic_stretch)}: give [share of scenes in 0..1, "
                             "widest aspect >= 1]")
        fewest, most = self.synthetic_relation_candidates
        if not 2 <= fewest <= most <= MAX_RELATION_CANDIDATES:
            raise ValueError(f"synthetic_relation_candidates={list(self.synthetic_relation_candidates)}: give "
                             f"[fewest, most] with 2 <= fewest <= most <= {MAX_RELATION_CANDIDATES}")
