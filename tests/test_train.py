"""Training: optimizer groups, schedule, global batches, run outputs, exact resume, crash safety, DDP.

Every run is a two-layer, width-32 model on 64 px synthetic scenes: a few seconds on a laptop CPU.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from _tiny_model import TINY_MODEL
from safetensors.torch import load_file

import sharedris.train.loop as loop
from sharedris.checkpoint import atomic_write, load_resume_state, save_resume_state
from sharedris.config import merge, to_dict
from sharedris.data.synthetic import SyntheticRefScenes
from sharedris.metrics import METRIC_KEYS
from sharedris.modeling.pretrained import load_pretrained
from sharedris.modeling.registry import build_model
from sharedris.train.config import OptimConfig, TrainConfig
from sharedris.train.loop import GlobalBatchSampler, train
from sharedris.train.optim import build_optimizer, build_scheduler, param_groups, warmup_poly

TESTS = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")

# 32 samples / batch 8 = 4 steps per epoch, 8 steps in all.
TINY_RUN = {
    "model": "sharedris_tiny",
    "model_overrides": TINY_MODEL,
    "data": {"synthetic_image_size": 64, "synthetic_train_size": 32, "synthetic_eval_size": 8, "num_workers": 0},
    "batch_size": 8,
    "epochs": 2,
    "drop_path": 0.0,
    "log_every": 1,
    "amp": "none",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as in the torchrun subprocesses (OMP_NUM_THREADS=1): these models are too
    small to gain from more, a busy machine makes extra threads spin, and the in-process reference
    of the distributed tests then runs the same kernels as the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(out_dir: Path, **delta) -> TrainConfig:
    return merge(merge(TrainConfig(), TINY_RUN), {"out_dir": str(out_dir), **delta})


def _tiny_model(depth: int = 2):
    torch.manual_seed(0)
    return build_model("sharedris_tiny", **{**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "depth": depth}})


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ optimizer
def test_param_groups_weight_decay_and_frozen_parameters():
    model = _tiny_model(depth=3)  # taps end at block 2: block 3 and the final norm are frozen
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(decay_of)  # no parameter in two groups
    params = dict(model.named_parameters())

    frozen = [n for n in params if n.startswith(("encoder.norm.", "encoder.blocks.2."))]
    assert frozen and all(not params[n].requires_grad and id(params[n]) not in decay_of for n in frozen)
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert all(id(params[n]) in decay_of for n in trainable)

    for name in ("encoder.cls_token", "encoder.pos_embed_vision", "encoder.pos_embed_text", "decoder.query_embed",
                 "decoder.logit_scale", "encoder.blocks.0.norm1.A.weight", "encoder.blocks.0.norm1.A.bias"):
        assert decay_of[id(params[name])] == 0.0, name
    for name in ("encoder.text_embed.weight", "encoder.blocks.0.qkv.A.weight", "fpn.laterals.0.0.weight",
                 "decoder.query_proj.weight"):
        assert decay_of[id(params[name])] == 0.05, name
    for name in trainable:  # the general rule: 1-D tensors never decay
        if params[name].ndim <= 1:
            assert decay_of[id(params[name])] == 0.0, name


def test_param_groups_lr_scales():
    model = _tiny_model(depth=3)
    cfg = OptimConfig(lr=1e-4, new_module_lr_mult=10.0)
    scale_of = {id(p): (g["lr_scale"], g["lr"]) for g in param_groups(model, cfg) for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = 1.0 if name.startswith("encoder.") else 10.0
            assert scale_of[id(p)] == pytest.approx((expected, 1e-4 * expected)), name

    decayed = OptimConfig(lr=1e-4, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in param_groups(model, decayed) for p in g["params"]}
    params = dict(model.named_parameters())

    def scale(name: str) -> float:
        return scale_of[id(params[name])]

    # depth 3: embeddings are layer 0 (0.5**4), block i is layer i + 1 (0.5**(3 - i))
    assert scale("encoder.patch_embed.0.weight") == pytest.approx(0.5**4)
    assert scale("encoder.pos_embed_text") == pytest.approx(0.5**4)
    assert scale("encoder.blocks.0.qkv.A.weight") == pytest.approx(0.5**3)
    assert scale("encoder.blocks.1.qkv.B.bias") == pytest.approx(0.5**2)
    assert scale("fpn.laterals.0.0.weight") == scale("decoder.query_embed") == 10.0  # new modules: no decay


def test_optimizer_uses_group_lrs():
    model = _tiny_model()
    cfg = OptimConfig(lr=2e-4, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [2e-4, 2e-3]
    assert opt.defaults["betas"] == cfg.betas


def test_warmup_poly_schedule():
    assert warmup_poly(0, 4, 20, 0.9) == pytest.approx(0.25)
    assert warmup_poly(3, 4, 20, 0.9) == pytest.approx(1.0)  # last warmup step reaches the full lr
    assert warmup_poly(4, 4, 20, 0.9) == pytest.approx(1.0)  # decay starts from 1
    assert warmup_poly(12, 4, 20, 1.0) == pytest.approx(0.5)
    assert warmup_poly(12, 4, 20, 0.9) == pytest.approx(0.5**0.9)
    assert warmup_poly(20, 4, 20, 0.9) == 0.0
    assert warmup_poly(25, 4, 20, 0.9) == 0.0  # never negative past the end
    assert warmup_poly(0, 0, 10, 1.0) == 1.0  # no warmup

    model = _tiny_model()
    opt = build_optimizer(model, OptimConfig(lr=1e-3, new_module_lr_mult=10.0))
    sched = build_scheduler(opt, warmup_steps=2, total_steps=6, power=1.0)
    seen = []
    for _ in range(6):
        seen.append(sorted(g["lr"] for g in opt.param_groups))
        opt.step()
        sched.step()
    # factors 0.5, 1, 1, 0.75, 0.5, 0.25, times each group's base lr
    for lrs, factor in zip(seen, [0.5, 1, 1, 0.75, 0.5, 0.25]):
        assert lrs[0] == pytest.approx(1e-3 * factor) and lrs[-1] == pytest.approx(1e-2 * factor)


# ------------------------------------------------------------------------------------ batches
def _global_batches(length: int, batch: int, world: int, accum: int, epoch: int = 0, start: int = 0):
    """Per step, the concatenation of every rank's micro-batches (rank-major)."""
    per_rank = [list(GlobalBatchSampler(length, batch, r, world, accum, seed=3, epoch=epoch, start_step=start))
                for r in range(world)]
    steps = len(per_rank[0]) // accum
    assert all(len(p) == steps * accum for p in per_rank)
    for p in per_rank:
        assert all(len(m) == batch // (world * accum) for m in p)
    return [sum((per_rank[r][s * accum + m] for r in range(world) for m in range(accum)), []) for s in range(steps)]


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    one = _global_batches(42, 8, world=1, accum=1)
    assert len(one) == 5  # 42 // 8; the remainder is dropped
    assert len({i for b in one for i in b}) == 40  # no sample twice in an epoch
    assert _global_batches(42, 8, world=2, accum=2) == one
    assert _global_batches(42, 8, world=4, accum=1) == one
    assert _global_batches(42, 8, world=1, accum=4) == one
    assert _global_batches(42, 8, world=1, accum=1, epoch=1) != one  # a new order every epoch


def test_global_batch_sampler_start_step_skips_exactly():
    full = _global_batches(40, 8, world=2, accum=2)
    for start in range(6):
        assert _global_batches(40, 8, world=2, accum=2, start=start) == full[start:]
    sampler = GlobalBatchSampler(40, 8, rank=1, world=2, accum=2, seed=3, epoch=0, start_step=2)
    assert len(sampler) == len(list(sampler)) == 3 * 2


# ------------------------------------------------------------------------------------ runs
# Run A: uninterrupted, with resume files mid-epoch (checkpoint_every=3: steps 3, 4, 6, 8), gradient
# accumulation and drop path (so that the RNG state matters for an exact resume).
# With a stem stage: a resumed run must take the stem from last.pt, not run the stage again.
# With fresh scenes every epoch: a run resumed in epoch 1 must read epoch 1's scenes.
RESUME_DELTA = {"checkpoint_every": 3, "grad_accum": 2, "drop_path": 0.2,
                "stem_pretrain": {"steps": 2, "scenes_per_step": 2}, "data": {"synthetic_fresh_epochs": True}}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> tuple[TrainConfig, Path]:
    cfg = _cfg(tmp_path_factory.mktemp("run") / "a", **RESUME_DELTA)
    return cfg, train(cfg, device="cpu")


def test_training_run_writes_its_outputs(run_a):
    cfg, run = run_a
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(cfg)
    log = _log(run)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert {"loss", "bce", "dice", "lr", "grad_norm", "epoch"} <= set(log[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert [r["step"] for r in json.loads((run / "stem_pretrain.json").read_text())["history"]] == [1, 2]
    settings = (run / "settings.txt").read_text()
    params = sum(p.numel() for p in build_model("sharedris_tiny", **TINY_MODEL).parameters())
    assert f"sharedris_tiny ({params / 1e6:.1f} M parameters) on cpu, world size 1, amp off (fp32)" in settings
    assert "global batch 8 = 1 x 2 accumulation x 4, 32 samples per epoch, 4 steps per epoch, 2 epochs" in settings

    for epoch in (1, 2):
        metrics = json.loads((run / "metrics" / f"epoch_{epoch:03d}.json").read_text())
        assert metrics["epoch"] == epoch and metrics["step"] == 4 * epoch and metrics["split"] == "val"
        assert metrics["num_samples"] == 8
        keys = {*METRIC_KEYS, "cIoU", "gIoU", "N-acc", "T-acc"}
        assert set(metrics["overall"]) == keys
        assert metrics["groups"] and set(metrics["groups"]) <= set(SyntheticRefScenes.groups)
        assert all(set(m) == keys for m in metrics["groups"].values())

    state = load_resume_state(run / "last.pt")
    assert state["step"] == 8 and state["config"] == to_dict(cfg)
    final = load_pretrained(run / "final")
    assert load_pretrained(run / "best").config == final.config
    for k, v in final.state_dict().items():
        assert torch.equal(v, state["model"][k]), k

    # The saved folder predicts exactly what the trained weights predict.
    trained = build_model(final.config)
    trained.load_state_dict(state["model"])
    trained.eval()
    torch.manual_seed(1)
    image, ids = torch.randn(2, 3, 64, 64), torch.randint(4, 500, (2, 24))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 10:] = True
    with torch.no_grad():
        assert torch.equal(final(image, ids, pad).mask_logits, trained(image, ids, pad).mask_logits)


def _crash_at_call(monkeypatch, n: int) -> None:
    """Make the n-th loss computation raise, as a killed process would stop mid-step."""
    real, calls = loop.referring_loss, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "referring_loss", crashing)


def _record_training_scenes(monkeypatch) -> set[int]:
    """The scene numbers of the synthetic training split read from now on."""
    seen, real = set(), SyntheticRefScenes.__getitem__

    def recording(self, index):
        sample = real(self, index)
        if sample["split"] == "train":
            seen.add(sample["index"])
        return sample

    monkeypatch.setattr(SyntheticRefScenes, "__getitem__", recording)
    return seen


def test_resume_after_a_crash_equals_the_uninterrupted_run(run_a, tmp_path, monkeypatch):
    cfg_a, run_a_dir = run_a
    cfg = replace(cfg_a, out_dir=str(tmp_path / "b"))
    # 2 loss calls per step (grad_accum 2): call 15 is step 8. The last resume file is from step 6,
    # so step 7 (already logged) is trained again.
    _crash_at_call(monkeypatch, 15)
    seen = _record_training_scenes(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, device="cpu")
    run = Path(cfg.out_dir)
    assert load_resume_state(run / "last.pt")["step"] == 6
    assert not (run / "final").exists()
    # 32 scenes per epoch: epoch 0 reads scenes 0-31, epoch 1 (steps 5-7 and half of 8) new ones.
    assert set(range(32)) <= seen and len(seen - set(range(32))) >= 28 and max(seen) < 64
    monkeypatch.undo()

    seen = _record_training_scenes(monkeypatch)
    train(cfg, resume=True, device="cpu")
    assert seen and min(seen) >= 32 and max(seen) < 64  # steps 7-8: epoch 1's scenes
    ours, theirs = load_file(run / "final" / "model.safetensors"), load_file(run_a_dir / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    drop_time = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _log(run)]
    assert drop_time == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _log(run_a_dir)]
    assert (json.loads((run / "metrics" / "epoch_002.json").read_text())
            == json.loads((run_a_dir / "metrics" / "epoch_002.json").read_text()))

    changed = replace(cfg, optim=replace(cfg.optim, lr=1e-3))
    with pytest.raises(ValueError, match="different config"):
        train(changed, resume=True, device="cpu")



def test_init_from_starts_from_a_model_folder(run_a, tmp_path):
    _, run_a_dir = run_a
    start = load_pretrained(run_a_dir / "final")
    # learning rate 0: the run's weights stay those it started from, so final/ must equal them
    cfg = _cfg(tmp_path / "c", epochs=1, init_from=str(run_a_dir / "final"), optim={"lr": 0.0})
    final = load_pretrained(train(cfg, device="cpu") / "final")
    for k, v in start.state_dict().items():
        assert torch.equal(final.state_dict()[k], v), k
    scratch = load_pretrained(train(replace(cfg, init_from=None, out_dir=str(tmp_path / "d")), device="cpu") / "final")
    assert any(not torch.equal(scratch.state_dict()[k], v) for k, v in start.state_dict().items())


def test_init_from_at_another_input_size_resamples_the_vision_positions(run_a, tmp_path):
    from sharedris.modeling.beit3 import resample_vision_positions

    _, run_a_dir = run_a
    start = load_pretrained(run_a_dir / "final").state_dict()
    cfg = _cfg(tmp_path / "big", epochs=1, init_from=str(run_a_dir / "final"), optim={"lr": 0.0},
               model_overrides={**TINY_MODEL, "image_size": 96})
    final = load_pretrained(train(cfg, device="cpu") / "final")
    assert final.config.image_size == 96
    positions = "encoder.pos_embed_vision"
    grown = final.state_dict()[positions]
    assert grown.shape[0] == start[positions].shape[0] - 16 + 36  # a 4x4 token grid became 6x6
    assert torch.equal(grown, resample_vision_positions(start[positions], 6))
    assert torch.equal(grown[:3], start[positions][:3])  # the offset rows and CLS are kept as they were
    for k, v in start.items():
        if k != positions:
            assert torch.equal(final.state_dict()[k], v), k


def test_a_resumed_run_takes_its_weights_from_the_resume_file_not_init_from(run_a, tmp_path):
    import shutil

    start = shutil.copytree(run_a[1] / "final", tmp_path / "start")
    cfg = _cfg(tmp_path / "h", epochs=1, init_from=str(start))
    run = train(cfg, device="cpu")
    shutil.rmtree(start)  # the folder the run started from is gone; last.pt has everything
    assert train(cfg, resume=True, device="cpu") == run
    with pytest.raises(ValueError, match="does not exist"):  # a fresh start still needs it
        train(replace(cfg, out_dir=str(tmp_path / "i")), device="cpu")


def test_init_from_refuses_what_it_cannot_use(run_a, tmp_path):
    _, run_a_dir = run_a
    shallower = {**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "depth": 1}, "taps": (1, 1, 1, 1)}
    wider = {**TINY_MODEL, "encoder": {**TINY_MODEL["encoder"], "depth": 3, "mlp_dim": 96}, "taps": (1, 1, 2, 3)}
    for i, other in enumerate((shallower, wider)):  # a deeper encoder grows only when the rest fits
        with pytest.raises(ValueError, match="another architecture"):
            train(_cfg(tmp_path / f"e{i}", init_from=str(run_a_dir / "final"), model_overrides=other), device="cpu")
    with pytest.raises(ValueError, match="init_from='.*missing'.*does not exist"):
        train(_cfg(tmp_path / "f", init_from=str(tmp_path / "missing")), device="cpu")
    with pytest.raises(ValueError, match="set only one of them"):
        train(_cfg(tmp_path / "g", init_from=str(run_a_dir / "final"), encoder_weights="beit3.pth"), device="cpu")
    assert not any((tmp_path / name).exists() for name in ("e0", "e1", "f"))


@pytest.mark.parametrize("setting, added, zero", [
    ("coord_features", {"decoder.coord_proj.weight"}, lambda w: w["decoder.coord_proj.weight"]),
    ("anchor_point", {f"decoder.{mlp}.{i}.{p}" for mlp in ("anchor_mlp", "bowl_mlp") for i in (0, 2)
                      for p in ("weight", "bias")},
     lambda w: torch.cat([w["decoder.bowl_mlp.2.weight"].flatten(), w["decoder.bowl_mlp.2.bias"]])),
])
def test_init_from_into_a_decoder_with_a_new_part_starts_it_as_no_change(run_a, tmp_path, setting, added, zero):
    _, run_a_dir = run_a
    start = load_pretrained(run_a_dir / "final").eval()
    grown_model = {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], setting: True}}
    cfg = _cfg(tmp_path / setting, epochs=1, init_from=str(run_a_dir / "final"), model_overrides=grown_model,
               optim={"lr": 0.0}, loss={"rank_weight": 0.5 if setting == "anchor_point" else 0.0})
    run = train(cfg, device="cpu")
    grown = load_pretrained(run / "final").eval()
    assert getattr(grown.config.decoder, setting)
    weights = grown.state_dict()
    assert set(weights) - set(start.state_dict()) == added
    assert not zero(weights).any()
    if setting == "anchor_point":  # trained on the scenes' relations: the anchor and ranking terms are logged
        assert all({"anchor", "rank"} <= set(line) for line in _log(run) if "loss" in line)
    torch.manual_seed(4)
    image, ids = torch.randn(2, 3, 64, 64), torch.randint(4, 500, (2, 12))
    with torch.no_grad():
        assert torch.equal(start(image, ids).mask_logits, grown(image, ids).mask_logits)


@pytest.mark.parametrize("part, overrides, added", [
    ("encoder", {"encoder": {**TINY_MODEL["encoder"], "depth": 4}, "taps": (1, 1, 2, 4)}, (2, 3)),
    ("decoder", {"decoder": {**TINY_MODEL["decoder"], "depth": 3}}, (1, 2)),
])
def test_init_from_into_a_deeper_encoder_or_decoder_starts_the_new_blocks_as_the_identity(
    run_a, tmp_path, part, overrides, added
):
    _, run_a_dir = run_a
    start = load_pretrained(run_a_dir / "final").eval()
    cfg = _cfg(tmp_path / "deep", epochs=1, init_from=str(run_a_dir / "final"),
               model_overrides={**TINY_MODEL, **overrides}, optim={"lr": 0.0})
    grown = load_pretrained(train(cfg, device="cpu") / "final").eval()
    assert getattr(grown.config, part).depth == added[-1] + 1
    weights, fresh = grown.state_dict(), _tiny_model().state_dict()
    for k, v in start.state_dict().items():
        assert torch.equal(weights[k], v), k
    new = [k for k in weights if k.startswith(tuple(f"{part}.blocks.{i}." for i in added))]
    assert set(weights) - set(start.state_dict()) == set(new)
    outputs = [k for k in new if ".proj." in k or ".fc2." in k]
    assert len(outputs) == 2 * 2 * 4  # per block: proj and fc2, weight and bias, for both experts
    assert all(not weights[k].any() for k in outputs)
    assert any(weights[k].any() for k in new if k not in outputs)  # the rest keeps a fresh initialisation
    # the grown model answers exactly as the one it started from (the encoder's last tap now follows block 4)
    torch.manual_seed(3)
    image, ids = torch.randn(2, 3, 64, 64), torch.randint(4, 500, (2, 12))
    padding = torch.arange(12).expand(2, 12) >= torch.tensor([[5], [12]])
    with torch.no_grad():
        a, b = start(image, ids, padding), grown(image, ids, padding)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.presence_logits, b.presence_logits)
    assert torch.equal(a.iou_pred, b.iou_pred)
    assert not torch.equal(fresh["encoder.blocks.0.proj.A.weight"], weights["encoder.blocks.0.proj.A.weight"])


def test_a_head_only_stage_trains_the_head_alone_from_a_fresh_start(run_a, tmp_path):
    _, run_a_dir = run_a
    start = load_pretrained(run_a_dir / "final").state_dict()
    fresh = _tiny_model().state_dict()  # what build_model gives with the run's seed
    head = ("decoder.iou_mlp.",)
    cfg = _cfg(tmp_path / "j", epochs=1, init_from=str(run_a_dir / "final"), init_skip=list(head),
               train_only=list(head), optim={"lr": 1e-2, "new_module_lr_mult": 1.0, "warmup_epochs": 0.0})
    run = train(cfg, device="cpu")
    final = load_pretrained(run / "final").state_dict()
    for k, v in start.items():
        if k.startswith(head):
            assert not torch.equal(final[k], v), f"{k} kept the init_from weights"
        else:
            assert torch.equal(final[k], v), f"{k} changed although only {head} trains"
    assert not torch.equal(final["decoder.iou_mlp.2.weight"], fresh["decoder.iou_mlp.2.weight"])  # it trained
    # without train_only the same start trains everything; init_skip alone keeps the head's fresh start
    skip = load_pretrained(train(replace(cfg, train_only=(), optim=replace(cfg.optim, lr=0.0),
                                         out_dir=str(tmp_path / "k")), device="cpu") / "final").state_dict()
    assert torch.equal(skip["decoder.iou_mlp.0.weight"], fresh["decoder.iou_mlp.0.weight"])
    assert torch.equal(skip["decoder.mask_mlp.0.weight"], start["decoder.mask_mlp.0.weight"])
    with pytest.raises(ValueError, match="train_only=.*names no parameter"):
        train(replace(cfg, train_only=("decoder.nothing",), out_dir=str(tmp_path / "l")), device="cpu")
    with pytest.raises(ValueError, match="init_skip=.*names no parameter"):
        train(replace(cfg, init_skip=("decoder.nothing",), out_dir=str(tmp_path / "l")), device="cpu")
    with pytest.raises(ValueError, match="init_from is not set"):
        train(replace(cfg, init_from=None, out_dir=str(tmp_path / "l")), device="cpu")


def test_init_from_takes_weights_that_fit_whatever_the_weightless_settings(run_a, tmp_path):
    _, run_a_dir = run_a
    other = {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], "iou_from_mask": False}}
    cfg = _cfg(tmp_path / "m", epochs=1, init_from=str(run_a_dir / "final"), model_overrides=other,
               optim={"lr": 0.0})
    final = load_pretrained(train(cfg, device="cpu") / "final")
    assert final.config.decoder.iou_from_mask is False
    for k, v in load_pretrained(run_a_dir / "final").state_dict().items():
        assert torch.equal(final.state_dict()[k], v), k


# ------------------------------------------------------------------------------------ files
def test_atomic_write_keeps_the_previous_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"previous")

    def broken(path: Path) -> None:
        path.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]

    atomic_write(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_writes_get_the_usual_permissions_even_when_the_writer_recreates_the_file(tmp_path):
    def recreate(path: Path) -> None:  # as safetensors' save_file does
        path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"weights")
        os.close(fd)

    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "model.safetensors", recreate)
    finally:
        os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_resume_state_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    save_resume_state(path, {"step": 3, "payload": _Exploit(marker)})
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing"):
        load_resume_state(path)
    assert not marker.exists()

    save_resume_state(path, {"step": 3, "model": {"w": torch.ones(2)}, "rng": [torch.get_rng_state()]})
    assert load_resume_state(path)["step"] == 3


# ------------------------------------------------------------------------------------ distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _overrides(delta: dict, prefix: str = "") -> list[str]:
    """A nested config delta as ``a.b=value`` command-line overrides (dict-valued fields as JSON)."""
    out = []
    for k, v in delta.items():
        if isinstance(v, dict) and k != "model_overrides":
            out += _overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    # A larger lr than the default so that a wrong gradient (e.g. one rank's half batch) moves the
    # weights far more than the tolerance.
    delta = {**TINY_RUN, "grad_accum": 2, "optim": {"lr": 1e-3}}
    _torchrun(["-m", "sharedris", "train", *_overrides(delta), f"out_dir={tmp_path / 'ddp'}", "--device", "cpu"],
              cwd=tmp_path)
    single = train(_cfg(tmp_path / "single", optim={"lr": 1e-3}), device="cpu")
    ddp = tmp_path / "ddp"

    log_ddp, log_one = _log(ddp), _log(single)
    assert [r["step"] for r in log_ddp] == [r["step"] for r in log_one] == list(range(1, 9))
    for a, b in zip(log_ddp, log_one):  # the logged loss is the global-batch mean
        for key in ("loss", "bce", "dice", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    ours, theirs = load_file(ddp / "final" / "model.safetensors"), load_file(single / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    lr, steps, new_mult = 1e-3, len(log_one), OptimConfig().new_module_lr_mult  # new modules learn new_mult x faster
    for k in ours:
        # The two runs sum the same gradients in another order, so they differ by float rounding,
        # which AdamW passes on almost unchanged: except where a true gradient is ~0, as its first
        # step moves a weight by lr * sign(gradient), and rounding can flip that sign (a
        # difference of up to 2 * lr per step). So: every weight within that bound, and all but a
        # few in a thousand (or one) within 1e-4 (a wrong gradient, e.g. one rank's half batch, moves
        # nearly all of them by ~lr). The FPN's convs (and the LayerNorms before them) carry
        # biases that a one-channel-per-group GroupNorm cancels: their true gradient is 0
        # everywhere, so the FPN is compared by what it computes, below.
        if k.startswith("fpn."):
            continue
        diff = (ours[k] - theirs[k]).abs()
        assert diff.max() <= 2 * lr * (1 if k.startswith("encoder.") else new_mult) * steps, k
        assert int((diff > 1e-4).sum()) <= max(1, 0.003 * diff.numel()), (k, int((diff > 1e-4).sum()), diff.numel())
    torch.manual_seed(1)
    image, ids = torch.randn(4, 3, 64, 64), torch.randint(4, 500, (4, 24))
    with torch.no_grad():
        out_ddp = load_pretrained(ddp / "final")(image, ids).mask_logits
        out_one = load_pretrained(single / "final")(image, ids).mask_logits
    assert out_one.abs().mean() > 0.1  # logits of O(1): a batch of 4 instead of 8 moves them by O(1) here
    torch.testing.assert_close(out_ddp, out_one, rtol=0, atol=1e-3)
    for epoch in (1, 2):
        m_ddp = json.loads((ddp / "metrics" / f"epoch_{epoch:03d}.json").read_text())
        m_one = json.loads((single / "metrics" / f"epoch_{epoch:03d}.json").read_text())
        assert m_ddp["num_samples"] == m_one["num_samples"] == 8
        assert m_ddp["overall"]["oIoU"] == pytest.approx(m_one["overall"]["oIoU"], abs=1e-3)


def _load_dist_eval():
    spec = importlib.util.spec_from_file_location("_dist_eval", TESTS / "_dist_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_distributed_evaluation_equals_single_process(tmp_path):
    out = tmp_path / "dist.json"
    _torchrun([str(TESTS / "_dist_eval.py"), str(out)], cwd=tmp_path)
    distributed = json.loads(out.read_text())

    single = _load_dist_eval().evaluate_fixed_models()  # one thread, as the ranks (see _one_thread)

    assert distributed.keys() == single.keys() == {"tiny_model", "oracle"}
    # The oracle's IoUs spread over [0, 1], so every P@X threshold is exercised.
    assert 0 < single["oracle"]["overall"]["P@0.5"] < 1 and 0 < single["oracle"]["overall"]["P@0.9"] < 1
    for name, res in single.items():
        dist_res = distributed[name]
        assert dist_res["num_samples"] == res["num_samples"] == 13
        assert dist_res["groups"].keys() == res["groups"].keys()
        for group, expected in [("overall", res["overall"]), *res["groups"].items()]:
            got = dist_res["overall"] if group == "overall" else dist_res["groups"][group]
            for key in METRIC_KEYS:
                if key == "mIoU":
                    assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), (name, group)
                else:
                    assert got[key] == expected[key], (name, group, key)
