"""The training loop, readable top to bottom: one process or one rank of a torchrun job."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

from sharedris.checkpoint import atomic_write, load_resume_state, save_resume_state
from sharedris.config import to_dict
from sharedris.data.datasets import RISSamples, collate
from sharedris.data.registry import build_source
from sharedris.devices import keep_freed_memory
from sharedris.evaluate import evaluate
from sharedris.losses import RelationTargets, referring_loss
from sharedris.modeling.pretrained import PretrainedError, read_checkpoint, resolve_tokenizer, save_pretrained
from sharedris.modeling.beit3 import resample_vision_positions
from sharedris.modeling.registry import build_model, model_config
from sharedris.precision import autocast_context, training_amp_dtype
from sharedris.progress import progress, write
from sharedris.text import Tokenizer
from sharedris.train.config import TrainConfig
from sharedris.distributed import DistInfo, cleanup_distributed, init_distributed
from sharedris.train.optim import build_optimizer, build_scheduler
from sharedris.train.stem import pretrain_stem

RESUME_FILE = "last.pt"


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches of one epoch, in a fixed order.

    The epoch's permutation depends only on (seed, epoch); global batch ``s`` is
    ``perm[s*B:(s+1)*B]``, split into ``world`` equal shards, each split into ``accum``
    micro-batches. So 1 process x batch B and N processes x B/N see the same global batches, and
    a resumed run skips exactly the batches already done.
    """

    def __init__(self, length: int, global_batch: int, rank: int, world: int, accum: int,
                 seed: int, epoch: int, start_step: int = 0) -> None:
        self.length, self.global_batch = length, global_batch
        self.rank, self.world, self.accum = rank, world, accum
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        self.micro = global_batch // (world * accum)

    @property
    def steps(self) -> int:
        return self.length // self.global_batch

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.length, generator=g).tolist()
        shard = self.global_batch // self.world
        for step in range(self.start_step, self.steps):
            batch = perm[step * self.global_batch:(step + 1) * self.global_batch]
            mine = batch[self.rank * shard:(self.rank + 1) * shard]
            for m in range(self.accum):
                yield mine[m * self.micro:(m + 1) * self.micro]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_OPTIONAL_DECODER_PARTS = ("decoder.coord_proj.", "decoder.anchor_mlp.", "decoder.bowl_mlp.")


def _init_from(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Copy the weights of the model folder ``cfg.init_from`` into ``model``, except ``cfg.init_skip``.

    The folder's weights must fit ``model`` (same names and shapes), except that a model with
    another input size takes the folder's vision positions resampled to its own token grid, an
    encoder or a mask decoder with more blocks than the folder's takes the folder's blocks first and
    starts each extra block as the identity (see :func:`_grow_blocks`), and a decoder with coordinate features
    (``decoder.coord_features``: its coordinate map at zero) or an anchor point (``decoder.anchor_point``:
    its weight a at zero, the anchor's mask embedding freshly initialised) started from a folder
    without them answers as the folder's model; settings that hold no weights (e.g.
    ``decoder.iou_from_mask``) come from ``cfg.model`` and ``cfg.model_overrides``.
    """
    try:
        start = read_checkpoint(cfg.init_from)[2]  # the weights alone: no second model in memory
    except PretrainedError as e:
        raise ValueError(f"init_from={cfg.init_from!r}: {e}") from None
    own = model.state_dict()
    skip = _prefixes(model, "init_skip", cfg.init_skip)
    positions = "encoder.pos_embed_vision"
    if positions in start and positions in own and start[positions].shape[0] != own[positions].shape[0]:
        start[positions] = resample_vision_positions(start[positions], model.encoder.cfg.grid_size)
    start = _grow_blocks(_grow_blocks(start, own, "encoder.blocks."), own, "decoder.blocks.")
    for k in own:  # optional decoder parts, each built to start as no change to the answers
        if k.startswith(_OPTIONAL_DECODER_PARTS) and k not in start:
            start[k] = own[k]
    if {k: v.shape for k, v in start.items()} != {k: v.shape for k, v in own.items()}:
        raise ValueError(f"init_from={cfg.init_from!r} holds another architecture than model={cfg.model} with its "
                         "model_overrides; start from a folder of the same model")
    model.load_state_dict({k: own[k] if k.startswith(skip) else v for k, v in start.items()})


def _grow_blocks(
    start: dict[str, torch.Tensor], own: dict[str, torch.Tensor], prefix: str
) -> dict[str, torch.Tensor]:
    """``start`` with the blocks under ``prefix`` (``encoder.blocks.`` or ``decoder.blocks.``) that
    ``own`` has beyond it, each starting as the identity.

    Every Multiway block, of the encoder and of the mask decoder alike, adds its attention and its
    feed-forward branch to the running sequence (pre-norm residuals), so a block whose output
    projections (``proj`` and ``mlp.*.fc2``, both experts) are zero returns its input unchanged: a
    deeper model then computes exactly what the shallower one did at the same block, and training
    opens the new blocks from there. Their other weights keep their fresh initialisation. Returns
    ``start`` as it is when ``own`` has no extra block.
    """
    def depth(state: dict[str, torch.Tensor]) -> int:
        return len({k.split(".")[2] for k in state if k.startswith(prefix)})

    have, want = depth(start), depth(own)
    if want <= have:
        return start
    grown = dict(start)
    for k, v in own.items():
        if k.startswith(prefix) and int(k.split(".")[2]) >= have:
            zero = ".proj." in k or ".fc2." in k
            grown[k] = torch.zeros_like(v) if zero else v
    return grown


def _prefixes(model: torch.nn.Module, key: str, prefixes: Sequence[str]) -> tuple[str, ...]:
    """``prefixes`` (the config's ``key``) as a tuple, refused when they name no parameter of ``model``."""
    prefixes = tuple(prefixes)
    if prefixes and not any(name.startswith(prefixes) for name, _ in model.named_parameters()):
        raise ValueError(f"{key}={list(prefixes)} names no parameter of the model (e.g. decoder.iou_mlp)")
    return prefixes


def _select_trainable(model: torch.nn.Module, prefixes: Sequence[str]) -> None:
    """Freeze every parameter whose name starts with none of ``prefixes`` (nothing when empty)."""
    prefixes = _prefixes(model, "train_only", prefixes)
    if not prefixes:
        return
    for name, p in model.named_parameters():
        if not name.startswith(prefixes):
            p.requires_grad_(False)


def train(cfg: TrainConfig, resume: bool = False, device: str | None = None) -> Path:
    """Train a model as ``cfg`` says; returns the run folder.

    The run folder gets ``config.yaml`` (the resolved config), ``log.jsonl`` (one line per logged
    step; losses are means over the global batch), ``metrics/epoch_XXX.json`` per evaluation,
    ``stem_pretrain.json`` (with ``stem_pretrain.steps``: the stage's per-step loss and accuracy),
    ``last.pt`` (resume state), ``best/`` (the self-describing checkpoint with the best val
    ``select_on`` metric)
    and ``final/``.
    """
    info = init_distributed(device)
    try:
        out = _train(cfg, info, resume)
        if info.world > 1:  # rank 0 writes final/ last: no rank tears the group down before it is done
            torch.distributed.barrier()
        return out
    finally:
        cleanup_distributed()


@dataclass
class _Run:
    """Everything one training run holds, set up by :func:`_setup`."""

    cfg: TrainConfig
    info: DistInfo
    out: Path
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel on more than one rank
    tokenizer: Tokenizer
    train_set: RISSamples
    val_source: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    settings: str  # the one line of resolved settings


def _train(cfg: TrainConfig, info: DistInfo, resume: bool) -> Path:
    resuming = resume and (Path(cfg.out_dir) / RESUME_FILE).is_file()
    run = _setup(cfg, info, resuming)
    step, best, elapsed = _start(run, resuming)
    out = run.out
    bar = progress(total=run.total_steps, initial=step, desc="train", disable=not info.is_main, dynamic_ncols=True)
    log_file = (out / "log.jsonl").open("a") if info.is_main else None
    start = time.perf_counter() - elapsed  # wall time of the whole run, across resumes
    while step < run.total_steps:
        for micro_batches in _epoch_steps(run, step):
            terms, grad_norm = _train_step(run, micro_batches)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == run.total_steps:
                terms = _global_mean(run, terms)
                if info.is_main:
                    record = {"step": step, "epoch": step / run.steps_per_epoch, **terms,
                              "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                              "elapsed_s": time.perf_counter() - start}
                    bar.set_postfix(loss=f"{terms['loss']:.3f}")
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            epoch_done, in_epoch = divmod(step, run.steps_per_epoch)
            if in_epoch == 0 and (epoch_done % cfg.eval_every == 0 or step == run.total_steps):
                best = _validate(run, epoch_done, step, best)
            if in_epoch == 0 or step % cfg.checkpoint_every == 0:
                _save_resume(run, step, best, time.perf_counter() - start)
    bar.close()
    if log_file:
        log_file.close()
    if info.is_main:
        save_pretrained(run.model, out / "final")
    return out


def _setup(cfg: TrainConfig, info: DistInfo, resuming: bool) -> _Run:
    """The model (weights from ``init_from`` unless ``resuming``), tokenizer, data, optimizer and schedule."""
    cfg.check_world(info.world)
    amp_dtype = training_amp_dtype(cfg.amp, info.device)
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    mcfg = model_config(cfg.model, **cfg.model_overrides)
    model = build_model(mcfg, encoder_weights=cfg.encoder_weights, drop_path_rate=cfg.drop_path)
    if cfg.init_from is not None and not resuming:  # a resumed run takes its weights from the resume file
        _init_from(model, cfg)
    _select_trainable(model, cfg.train_only)
    if info.device.type == "cpu":
        keep_freed_memory()
    model.to(info.device)
    model.encoder.set_grad_checkpointing(cfg.grad_checkpointing)
    tokenizer_file = resolve_tokenizer(mcfg, cfg.tokenizer)
    model.tokenizer_file = tokenizer_file
    tokenizer = Tokenizer(tokenizer_file, max_len=mcfg.text_len)
    if tokenizer.vocab_size > mcfg.encoder.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_file} emits {tokenizer.vocab_size} ids but the model's "
                         f"text embedding has {mcfg.encoder.vocab_size} rows")

    train_set = RISSamples(build_source(cfg.data, cfg.data.train_split, train=True),
                           mcfg.image_size, mcfg.mean, mcfg.std,
                           relations=mcfg.decoder.anchor_point or cfg.loss.rank_weight > 0)
    # what the training expressions can say (None: an open vocabulary) travels with the weights
    model.vocabulary = getattr(train_set.source, "vocabulary", None)
    model.description = getattr(train_set.source, "description", None)
    val_source = build_source(cfg.data, cfg.data.val_split, train=False)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} samples, fewer than one batch of {cfg.batch_size}")
    total_steps = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg.optim)
    ddp = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
        if info.world > 1 else model
    return _Run(cfg=cfg, info=info, out=Path(cfg.out_dir), model=model, ddp=ddp, tokenizer=tokenizer,
                train_set=train_set, val_source=val_source, optimizer=optimizer,
                scheduler=build_scheduler(optimizer, warmup, total_steps, cfg.optim.poly_power),
                scaler=torch.amp.GradScaler(enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
                steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                settings=_settings_line(cfg, model, info, amp_dtype, len(train_set), steps_per_epoch))


def _start(run: _Run, resuming: bool) -> tuple[int, float, float]:
    """Restore the resume state when ``resuming``, or start afresh: (step, best, elapsed seconds)."""
    cfg, info, out = run.cfg, run.info, run.out
    if info.is_main:
        write(run.settings)
    step, best, elapsed = 0, -math.inf, 0.0
    if resuming:
        state = load_resume_state(out / RESUME_FILE)
        if state["config"] != to_dict(cfg):
            raise ValueError(f"{out / RESUME_FILE} was written with a different config; "
                             "resume with the same config or use another out_dir")
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        step, best, elapsed = state["step"], state["best"], state["elapsed_s"]
        _set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])
        if info.is_main:
            _truncate_log(out / "log.jsonl", step)
    else:
        summary = None
        if cfg.stem_pretrain.steps:
            # Every rank runs the same stage (same seed, same scenes): identical weights, no broadcast needed.
            mcfg = run.model.config
            _, summary = pretrain_stem(run.model.encoder.patch_embed, run.train_set.source, cfg.stem_pretrain,
                                       image_size=mcfg.image_size, mean=mcfg.mean, std=mcfg.std,
                                       device=info.device, show_progress=info.is_main)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "config.yaml", lambda p: p.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))
            if summary is not None:
                atomic_write(out / "stem_pretrain.json", lambda p: p.write_text(json.dumps(summary)))
    if info.is_main:
        atomic_write(out / "settings.txt", lambda p: p.write_text(run.settings + "\n"))
    return step, best, elapsed


def _epoch_steps(run: _Run, step: int) -> Iterator[list[dict[str, Any]]]:
    """The rest of ``step``'s epoch: each step's ``grad_accum`` micro-batches, the model in training mode."""
    cfg, info = run.cfg, run.info
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    if hasattr(run.train_set.source, "set_epoch"):  # e.g. synthetic scenes with fresh_epochs
        run.train_set.source.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(run.train_set), cfg.batch_size, info.rank, info.world, cfg.grad_accum,
                                 cfg.seed, epoch, start_step=in_epoch)
    loader_gen = torch.Generator().manual_seed(cfg.seed + epoch)  # not drawn from the global RNG
    loader = iter(DataLoader(run.train_set, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                             collate_fn=collate, generator=loader_gen, persistent_workers=False,
                             pin_memory=info.device.type == "cuda"))
    run.model.train()
    for _ in range(sampler.steps - in_epoch):
        yield [next(loader) for _ in range(cfg.grad_accum)]


def _train_step(run: _Run, micro_batches: Sequence[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (each loss term summed over them, grad norm)."""
    cfg, info = run.cfg, run.info
    window: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        ids, pad = run.tokenizer(batch["text"])
        image, target = batch["image"].to(info.device), batch["mask"].to(info.device)
        sync = i == len(micro_batches) - 1  # DDP all-reduces the gradients on the last one only
        with run.ddp.no_sync() if info.world > 1 and not sync else contextlib.nullcontext():
            with autocast_context(info.device, run.amp_dtype):
                output = run.ddp(image, ids.to(info.device), pad.to(info.device))
            relations = RelationTargets(*(batch[k].to(info.device) for k in RelationTargets._fields)) \
                if "anchors" in batch else None
            losses = referring_loss(output, target, relations, **to_dict(cfg.loss))
            run.scaler.scale(losses["loss"] / cfg.grad_accum).backward()
        for name, value in losses.items():
            window[name] = window.get(name, 0.0) + value.detach()
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad) \
        if cfg.optim.clip_grad > 0 else torch.tensor(0.0)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return window, grad_norm


def _global_mean(run: _Run, window: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each loss term's mean over the whole global batch (micro-batches and ranks are equal-sized), so
    the logged loss is the same for any world size x grad_accum."""
    names = sorted(window)  # the same terms on every rank
    mean = torch.stack([window[n] for n in names]) / (run.cfg.grad_accum * run.info.world)
    if run.info.world > 1:
        torch.distributed.all_reduce(mean)
    return dict(zip(names, mean.tolist()))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the resume point: those steps are about to be trained again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line the crash cut off
    atomic_write(path, lambda p: p.write_text("".join(kept)))


def _settings_line(cfg: TrainConfig, model: torch.nn.Module, info: DistInfo, amp_dtype: torch.dtype | None,
                   samples: int, steps_per_epoch: int) -> str:
    """The settings the run resolved to, in one line (printed at start, kept as ``settings.txt``)."""
    params = sum(p.numel() for p in model.parameters())
    amp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "off (fp32)")
    return (f"train: {cfg.model} ({params / 1e6:.1f} M parameters) on {info.device}, world size {info.world}, "
            f"amp {amp}, global batch {cfg.batch_size} = {info.world} x {cfg.grad_accum} accumulation x "
            f"{cfg.batch_size // (info.world * cfg.grad_accum)}, {samples} samples per epoch, "
            f"{steps_per_epoch} steps per epoch, {cfg.epochs} epochs")


def _validate(run: _Run, epoch: int, step: int, best: float) -> float:
    """Evaluate on the val split on all ranks; rank 0 writes the metrics and keeps ``best/``.

    Validation runs at the training precision (bf16 when training autocasts to bf16, else fp32), on
    PyTorch: weights that change every epoch are not worth converting for another runtime.
    """
    cfg, info, model = run.cfg, run.info, run.model
    model.eval()  # in eval mode and on its device, an fp32 evaluation runs the model itself, not a copy
    result = evaluate(model, run.val_source, run.tokenizer, device=info.device, runtime="torch",
                      precision="bf16" if run.amp_dtype == torch.bfloat16 else "fp32",
                      batch_size=max(1, cfg.batch_size // (info.world * cfg.grad_accum)))
    model.train()
    result.update(epoch=epoch, step=step, split=cfg.data.val_split)
    if info.is_main:
        atomic_write(run.out / "metrics" / f"epoch_{epoch:03d}.json",
                     lambda p: p.write_text(json.dumps(result, indent=2)))
        overall = result["overall"]
        shown = {k: "-" if overall[k] is None else f"{overall[k]:.4f}" for k in ("oIoU", "mIoU", "gIoU", "N-acc")}
        write(f"epoch {epoch}: val " + " ".join(f"{k} {v}" for k, v in shown.items()))
        if (overall[cfg.select_on] or 0.0) > best:
            save_pretrained(model, run.out / "best")
    return max(best, result["overall"][cfg.select_on] or 0.0)


def _save_resume(run: _Run, step: int, best: float, elapsed: float) -> None:
    """All ranks' RNG states are gathered so that each rank resumes its own stream."""
    rng = _rng_state()
    if run.info.world > 1:
        states: list[Any] = [None] * run.info.world
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if run.info.is_main:
        save_resume_state(run.out / RESUME_FILE, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "step": step, "best": best, "elapsed_s": elapsed, "rng": states, "config": to_dict(run.cfg),
        })
