"""AdamW parameter groups and the warmup + polynomial-decay schedule."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from sharedris.train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters by (lr scale, decay) for AdamW.

    - no weight decay on 1-D tensors (norms, biases) and on the names the model lists in
      ``no_weight_decay()`` (position tables, CLS token, learned queries);
    - encoder parameters at ``lr`` (times ``layer_decay ** (depth + 1 - layer)`` when
      ``layer_decay < 1``), every other module at ``lr * new_module_lr_mult``.
    Each group carries ``lr_scale``; the scheduler multiplies it in.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    encoder = getattr(model, "encoder", None)
    depth = encoder.cfg.depth if encoder is not None else 0
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if encoder is not None and name.startswith("encoder."):
            scale = cfg.layer_decay ** (depth + 1 - encoder.layer_id(name[len("encoder."):]))
        else:
            scale = cfg.new_module_lr_mult
        decay = p.ndim > 1 and name not in skip
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    return AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)


def warmup_poly(step: int, warmup_steps: int, total_steps: int, power: float) -> float:
    """LR factor: linear warmup from ~0 to 1 over ``warmup_steps``, then (1 - progress) ** power."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - progress) ** power


def build_scheduler(optimizer: AdamW, warmup_steps: int, total_steps: int, power: float) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: warmup_poly(step, warmup_steps, total_steps, power))
