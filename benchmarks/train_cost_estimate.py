"""ESTIMATE (not a measurement) of the GPU memory and time to train sharedris_base / sharedris_large.

Counted, on the meta device (shapes only, no weights, no GPU needed, under a minute on a CPU):
- parameters;
- forward FLOPs of one 480 px sample with 40 text tokens (``sharedris.benchmark.count_flops``);
- activation bytes autograd keeps for the backward pass of one sample (every tensor saved by a
  training forward in fp32, with and without the encoder's gradient checkpointing).

Assumed (printed with the table): training FLOPs = 3 x forward (4 x with gradient checkpointing, which
recomputes the encoder forward), bf16 keeps about half the fp32 activation bytes, AdamW costs 16 bytes
per parameter (fp32 weight, gradient, two moments), the recipe's 40 epochs of RefCOCO's 120,624
training sentences, and a model FLOPs utilisation (MFU) of 30-40 % of the GPU's dense bf16 peak.

Run: python benchmarks/train_cost_estimate.py [--gpus 8] [--batch 32]
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd.graph import saved_tensors_hooks

from sharedris.benchmark import count_flops
from sharedris.modeling.registry import build_model, model_config

SENTENCES = 120_624  # RefCOCO (unc) train split, the count `sharedris data check` compares with
EPOCHS = 40  # TrainConfig.epochs, the recipe of configs/refcoco_*.yaml
PEAK_BF16 = {"A100": 312e12, "H100 SXM": 989e12}  # dense bf16 tensor-core FLOP/s, vendor datasheets
MFU = (0.30, 0.40)
ADAMW_BYTES_PER_PARAM = 16
BF16_ACTIVATION_FACTOR = 0.5


def _inputs(cfg, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    S, L = cfg.image_size, cfg.text_len
    return (torch.empty(batch, 3, S, S, device="meta"), torch.zeros(batch, L, dtype=torch.long, device="meta"),
            torch.zeros(batch, L, dtype=torch.bool, device="meta"))


def saved_activation_bytes(model: torch.nn.Module, cfg) -> int:
    """Bytes of the tensors one training forward of one sample saves for backward (fp32, meta device)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):  # weights are counted with the parameters
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        model(*_inputs(cfg)).mask_logits.sum()
    return sum(seen.values())


def estimate(name: str) -> dict[str, float]:
    cfg = model_config(name)
    with torch.device("meta"):
        model = build_model(cfg).train()
    params = sum(p.numel() for p in model.parameters())
    fwd = count_flops(lambda: model.eval()(*_inputs(cfg)))
    model.train()
    act = saved_activation_bytes(model, cfg)
    model.encoder.set_grad_checkpointing(True)
    act_ckpt = saved_activation_bytes(model, cfg)
    # During the backward of a checkpointed model one block's activations are alive again.
    act_ckpt += (act - act_ckpt) / cfg.encoder.depth
    return {"params": params, "image_size": cfg.image_size, "fwd_flops": fwd, "act": act, "act_ckpt": act_ckpt,
            "depth": cfg.encoder.depth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs sharing the global batch")
    parser.add_argument("--batch", type=int, default=32, help="global batch (TrainConfig.batch_size)")
    args = parser.parse_args()
    per_gpu = max(1, args.batch // args.gpus)
    samples = SENTENCES * EPOCHS
    print(f"ESTIMATE, not a measurement: {EPOCHS} epochs x {SENTENCES:,} sentences = {samples:,} samples; "
          f"global batch {args.batch} on {args.gpus} GPUs ({per_gpu} per GPU); MFU {MFU[0]:.0%}-{MFU[1]:.0%}")
    for name in ("sharedris_base", "sharedris_large"):
        r = estimate(name)
        for ckpt in (False, True):
            train_flops = r["fwd_flops"] * (4 if ckpt else 3)
            act = (r["act_ckpt"] if ckpt else r["act"]) * BF16_ACTIVATION_FACTOR
            state = r["params"] * ADAMW_BYTES_PER_PARAM
            memory = state + act * per_gpu
            print(f"\n{name} ({r['params'] / 1e6:.0f}M params, {r['image_size']} px), gradient checkpointing "
                  f"{'on' if ckpt else 'off'}")
            print(f"  forward {r['fwd_flops'] / 1e9:.0f} GFLOPs/sample; training x{4 if ckpt else 3} = "
                  f"{train_flops / 1e9:.0f} GFLOPs/sample; total {train_flops * samples / 1e18:.1f} EFLOPs")
            print(f"  memory per GPU: weights+grads+AdamW {state / 2**30:.1f} GiB + activations "
                  f"{act / 2**30:.2f} GiB/sample (bf16) x {per_gpu} = {memory / 2**30:.1f} GiB "
                  f"(plus CUDA context, allocator slack, ~2-4 GiB)")
            for gpu, peak in PEAK_BF16.items():
                hours = [train_flops * samples / (peak * m) / 3600 for m in MFU[::-1]]
                print(f"  {gpu}: {hours[0]:.0f}-{hours[1]:.0f} GPU-hours = {hours[0] / args.gpus:.1f}-"
                      f"{hours[1] / args.gpus:.1f} h on {args.gpus} GPUs")


if __name__ == "__main__":
    main()
