"""The `sharedris` command line. Each subcommand parses its flags, then calls library code.

Errors a user can cause surface as one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import torch


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_bench(args: argparse.Namespace) -> None:
    from sharedris.benchmark import bench_encoder

    torch.set_num_threads(args.threads)
    rows = bench_encoder(args.sizes, runs=args.runs, text_len=args.text_len, batch=args.batch,
                         reference=args.reference, model=args.model)
    print(f"BEiT-3 {args.model} encoder, batch {args.batch}, {args.text_len} text tokens, "
          f"{args.threads} threads, median of {args.runs} runs")
    for row in rows:
        line = f"  {row['size']:>4d} px  ours {row['ours_s'] * 1000:8.1f} ms"
        if args.reference:
            line += (f"  torchscale {row['reference_s'] * 1000:8.1f} ms  speedup x{row['speedup']:.2f}"
                     f"  max|diff| {row['max_abs_diff']:.1e}")
        print(line)
    if args.json:
        print(json.dumps(rows))


def _cmd_train(args: argparse.Namespace) -> None:
    from sharedris.config import load_train_config
    from sharedris.train.loop import train

    cfg = load_train_config(args.config, args.overrides)
    out = train(cfg, resume=args.resume, device=args.device)
    print(f"run folder: {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharedris", description="Single-encoder referring image segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure speed")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    enc = bench_sub.add_parser("encoder", help="time the BEiT-3 encoder (optionally against torchscale)")
    enc.add_argument("--model", choices=["tiny", "base", "large"], default="base")
    enc.add_argument("--sizes", type=_int_list, default=[224, 480], help="image sizes, e.g. 224,480")
    enc.add_argument("--runs", type=int, default=5)
    enc.add_argument("--batch", type=int, default=1)
    enc.add_argument("--text-len", type=int, default=20)
    enc.add_argument("--threads", type=int, default=2)
    enc.add_argument("--reference", action="store_true",
                     help="also time torchscale's BEiT3 on identical weights (test extra)")
    enc.add_argument("--json", action="store_true", help="also print the rows as JSON")
    enc.set_defaults(func=_cmd_bench)

    tr = sub.add_parser("train", help="train a model (one process, or one rank under torchrun)",
                        description="Train. Defaults come from sharedris.config.TrainConfig, then the YAML "
                                    "file, then key.sub=value overrides. Under torchrun every rank runs this.")
    tr.add_argument("--config", help="YAML file of config deltas (see configs/)")
    tr.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if it exists")
    tr.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    tr.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=1e-4 epochs=3")
    tr.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (UserError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"sharedris {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
