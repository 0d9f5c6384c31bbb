"""The training configuration: typed defaults that YAML recipes and ``a.b=c`` overrides change."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sharedris.config import load_delta, merge
from sharedris.data.config import DataConfig


@dataclass
class OptimConfig:
    lr: float = 5e-5  # encoder learning rate
    new_module_lr_mult: float = 10.0  # FPN, decoder (and a stem trained from scratch) learn faster
    weight_decay: float = 0.01
    layer_decay: float = 1.0  # layer-wise lr decay for the encoder; 1.0 = off
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # max global grad norm; 0 = off
    warmup_epochs: float = 1.0
    poly_power: float = 0.9


@dataclass
class LossConfig:
    """Weights of the training loss terms (``sharedris.losses.referring_loss``).

    The mask term is ``bce_weight * BCE + dice_weight * Dice``; ``presence_weight`` weighs the
    presence head's BCE (does anything match), ``iou_weight`` the IoU head's squared error,
    ``anchor_weight`` the mask term of a relation's anchor (models with ``decoder.anchor_point``),
    ``rank_weight`` the ranking of a relation's candidates by the mask (0 = off;
    ``sharedris.losses.ranking_loss``).
    """

    bce_weight: float = 2.0
    dice_weight: float = 0.5
    presence_weight: float = 0.5
    iou_weight: float = 1.0
    anchor_weight: float = 1.0
    rank_weight: float = 0.0


@dataclass
class StemPretrainConfig:
    """A short stage before the referring loss: the image stem alone learns the objects' categories.

    Measured on sharedris_tiny (docs/training.md): trained from scratch, the referring loss alone
    never makes the stem encode shape; a few hundred steps of this stage do. Fresh runs only.
    """

    steps: int = 0  # 0 = off
    scenes_per_step: int = 16
    lr: float = 1e-3


SELECT_ON = ("oIoU", "mIoU", "gIoU", "cIoU")  # val metrics that can pick best/


@dataclass
class TrainConfig:
    model: str = "sharedris_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # passed to build_model
    encoder_weights: str | None = None  # official BEiT-3 file to initialise the encoder from
    init_from: str | None = None  # a model folder (e.g. an earlier run's best/) whose weights start this run
    # parameter-name prefixes whose init_from weights are not taken (they keep their fresh initialisation)
    init_skip: tuple[str, ...] = ()
    # parameter-name prefixes: train only these, the rest stays frozen (e.g. a head-only stage); () = all
    train_only: tuple[str, ...] = ()
    tokenizer: str | None = None  # SentencePiece file; None = the one bundled for the model
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stem_pretrain: StemPretrainConfig = field(default_factory=StemPretrainConfig)
    epochs: int = 40
    batch_size: int = 32  # global batch (all ranks, after accumulation)
    grad_accum: int = 1
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with AMX or AVX-512-BF16, else fp32) | bf16 | fp16 | none
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    seed: int = 0
    out_dir: str = "runs/default"
    eval_every: int = 1  # epochs
    select_on: str = "oIoU"  # val metric that picks best/: oIoU, mIoU, or gIoU/cIoU (data with no-target expressions)
    checkpoint_every: int = 500  # steps, besides every epoch end
    log_every: int = 20  # steps

    def __post_init__(self) -> None:
        """Refuse, in one sentence, settings that cannot train (those that need the world size: at start)."""
        if self.data.synthetic_renderer != "generator":
            from sharedris.data.registry import HELDOUT_FOR_EVALUATION_ONLY

            raise ValueError(f"data.synthetic_renderer={self.data.synthetic_renderer}: {HELDOUT_FOR_EVALUATION_ONLY}")
        if self.data.val_split.lower().startswith("test"):
            raise ValueError(f"data.val_split={self.data.val_split!r}: checkpoints are never selected on a test split")
        if self.select_on not in SELECT_ON:
            raise ValueError(f"select_on={self.select_on!r}: choose {', '.join(SELECT_ON[:-1])} or {SELECT_ON[-1]}")
        if self.init_from is not None and self.encoder_weights is not None:
            raise ValueError("init_from and encoder_weights both initialise the encoder; set only one of them")
        if self.init_skip and self.init_from is None:
            raise ValueError("init_skip names weights not to take from init_from, but init_from is not set")

    def check_world(self, world: int) -> None:
        """Refuse a global batch that ``world`` ranks x ``grad_accum`` micro-batches cannot split evenly."""
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"batch_size {self.batch_size} is not divisible by world size {world} x "
                             f"grad_accum {self.grad_accum}")


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML delta file at ``path`` (if any), then ``key=value`` overrides."""
    return merge(TrainConfig(), load_delta(path, overrides))
