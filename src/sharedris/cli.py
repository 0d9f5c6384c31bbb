"""The `sharedris` command line. Each subcommand parses its flags, then calls library code.

Errors a user can cause surface as one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_bench_model(args: argparse.Namespace) -> None:
    from sharedris.benchmark import bench_models, bench_training

    rows = bench_models(args.models, runs=args.runs, threads=args.threads, throughput_batch=args.batch)
    print(f"{args.threads} threads, median of {args.runs} runs, throughput at batch {args.batch}")
    print(f"{'model':<16} {'params':>9} {'encoder':>9} {'GFLOPs':>8} {'latency':>9} {'head':>6} "
          f"{'img/s':>7} {'peak RSS':>9}")
    for name, r in rows.items():
        print(f"{name:<16} {r['params'] / 1e6:8.1f}M {r['encoder_params'] / 1e6:8.1f}M {r['gflops']:8.1f} "
              f"{r['latency_s'] * 1000:7.0f}ms {r['head_share'] * 100:5.1f}% {r['throughput']:7.2f} "
              f"{r['peak_rss_mb']:7.0f}MB")
    if args.train_steps:
        sps = bench_training(steps=args.train_steps, threads=args.threads)
        rows["train_sharedris_tiny_samples_per_s"] = sps
        print(f"training sharedris_tiny (batch 16): {sps:.1f} samples/s")
    if args.json:
        print(json.dumps(rows))


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
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {out}")


def _load_model(name: str, device: str):
    from sharedris.modeling.pretrained import load_pretrained

    return load_pretrained(name, device=device)


def _cmd_predict(args: argparse.Namespace) -> None:
    from pathlib import Path

    from sharedris.data.images import load_image
    from sharedris.predictor import Predictor
    from sharedris.render import encode_rle, overlay

    image = load_image(args.image)
    pred = Predictor(_load_model(args.model, args.device), device=args.device).predict(image, args.text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    results = []
    for i, (text, mask, score) in enumerate(zip(args.text, pred.masks, pred.scores)):
        mask_path, overlay_path = out / f"{stem}_{i}_mask.png", out / f"{stem}_{i}_overlay.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        overlay(image, mask, text).save(overlay_path)
        results.append({"text": text, "score": round(float(score), 4), "mask_png": str(mask_path),
                        "overlay_png": str(overlay_path), "rle": encode_rle(mask)})
    if args.json:
        print(json.dumps({"image": args.image, "height": image.height, "width": image.width, "results": results}))
    else:
        for r in results:
            print(f"{r['score']:.3f}  {r['text']!r} -> {r['overlay_png']}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from sharedris.config import DataConfig
    from sharedris.data.datasets import build_source
    from sharedris.evaluate import evaluate
    from sharedris.metrics import format_table
    from sharedris.text import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_model(args.model, args.device)
    cfg = model.config
    tokenizer = Tokenizer(model.tokenizer_file, max_len=cfg.text_len)
    data = DataConfig(dataset=args.dataset, root=args.root, split_by=args.split_by,
                      synthetic_image_size=args.synthetic_image_size or cfg.image_size,
                      synthetic_eval_size=args.num_samples, seed=args.seed)
    rows, report = {}, {}
    for split in args.split:
        source = build_source(data, split, train=False)
        res = evaluate(model, source, tokenizer, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std,
                       device=args.device, batch_size=args.batch_size, protocol=args.protocol,
                       groups=getattr(source, "families", ()), num_workers=args.workers)
        report[split] = res
        rows[split] = res["overall"]
        rows.update({f"{split}/{g}": m for g, m in res["groups"].items()})
    print(f"model {args.model}, dataset {args.dataset}, protocol {args.protocol}")
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(report if len(report) > 1 else next(iter(report.values())), indent=2))


def _cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from sharedris.serve.app import Limits, create_app
    except ImportError:
        raise UserError("install the serve extra: pip install 'sharedris[serve]'") from None

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_texts=args.max_texts, max_text_chars=args.max_text_chars)
    app = create_app(args.model, limits=limits, device=args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from sharedris.export import export_onnx

    path = export_onnx(_load_model(args.model, "cpu"), args.out, opset=args.opset)
    print(f"wrote {path}")


def _cmd_data_check(args: argparse.Namespace) -> None:
    from sharedris.data.check import check_root

    problems = check_root(args.root, dataset=args.dataset, split_by=args.split_by, image_root=args.image_root)
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        raise UserError(f"{len(problems)} problem(s) in {args.root} (listed above)")
    print(f"ok: {args.root} is complete and readable")


def _cmd_data_tokenizer(args: argparse.Namespace) -> None:
    from sharedris.data.synthetic import SyntheticRefScenes
    from sharedris.text import train_tokenizer

    scenes = SyntheticRefScenes("train", size=128, length=args.scenes, seed=args.seed)
    texts = [t for i in range(len(scenes)) for t in scenes[i]["texts"]]
    print(f"wrote {train_tokenizer(texts, args.out, args.vocab_size)} from {len(texts)} expressions")


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
    bm = bench_sub.add_parser("model", help="size, GFLOPs, latency, throughput, memory per registered model")
    bm.add_argument("--models", type=lambda s: [x for x in s.split(",") if x],
                    default=["sharedris_tiny", "sharedris_base", "sharedris_large"])
    bm.add_argument("--runs", type=int, default=3)
    bm.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement")
    bm.add_argument("--threads", type=int, default=2)
    bm.add_argument("--train-steps", type=int, default=10, help="steps of the tiny training measurement (0 = skip)")
    bm.add_argument("--json", action="store_true")
    bm.set_defaults(func=_cmd_bench_model)

    tr = sub.add_parser("train", help="train a model (one process, or one rank under torchrun)",
                        description="Train. Defaults come from sharedris.config.TrainConfig, then the YAML "
                                    "file, then key.sub=value overrides. Under torchrun every rank runs this.")
    tr.add_argument("--config", help="YAML file of config deltas (see configs/)")
    tr.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if it exists")
    tr.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    tr.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=1e-4 epochs=3")
    tr.set_defaults(func=_cmd_train)

    pr = sub.add_parser("predict", help="segment what each expression refers to in an image")
    pr.add_argument("image", help="image file (any format Pillow reads)")
    pr.add_argument("-t", "--text", action="append", required=True, help="an expression; repeat for more")
    pr.add_argument("-o", "--out-dir", default="predictions", help="where to write mask and overlay PNGs")
    pr.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--json", action="store_true", help="print results (COCO RLE masks, scores) as JSON")
    pr.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("eval", help="oIoU / mIoU / Prec@X on a dataset split")
    ev.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    ev.add_argument("--dataset", default="synthetic")
    ev.add_argument("--split", type=lambda s: [x for x in s.split(",") if x], default=["test"],
                    help="comma-separated splits, e.g. val,testA,testB")
    ev.add_argument("--root", default=None, help="refer-format data root (or $SHAREDRIS_DATA)")
    ev.add_argument("--split-by", default=None)
    ev.add_argument("--protocol", choices=["original", "resized"], default="original",
                    help="score at each image's original size, or LAVT's 480x480")
    ev.add_argument("--num-samples", type=int, default=1000, help="synthetic: samples per split")
    ev.add_argument("--synthetic-image-size", type=int, default=None, help="synthetic: scene size (default: model size)")
    ev.add_argument("--seed", type=int, default=0, help="synthetic: dataset seed")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--workers", type=int, default=0)
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--out", default=None, help="write the metrics as JSON here")
    ev.set_defaults(func=_cmd_eval)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dc = data_sub.add_parser("check", help="check a refer-format data root (files, images, masks, counts)")
    dc.add_argument("--root", required=True, help="folder holding refcoco/, refcoco+/, refcocog/ and images/")
    dc.add_argument("--dataset", default=None, help="refcoco, refcoco+ or refcocog (default: every one present)")
    dc.add_argument("--split-by", default=None, help="unc, umd or google (default: every refs file present)")
    dc.add_argument("--image-root", default=None, help="default: <root>/images/train2014")
    dc.set_defaults(func=_cmd_data_check)
    dt = data_sub.add_parser("tokenizer", help="train the small tokenizer of models trained from scratch (tiny.spm)")
    dt.add_argument("-o", "--out", required=True, help="output .spm file")
    dt.add_argument("--vocab-size", type=int, default=511, help="pieces (ids = pieces + 1)")
    dt.add_argument("--scenes", type=int, default=3000, help="synthetic training scenes to read expressions from")
    dt.add_argument("--seed", type=int, default=0)
    dt.set_defaults(func=_cmd_data_tokenizer)

    sv = sub.add_parser("serve", help="HTTP API (POST /v1/segment, GET /healthz) and a demo page at /")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image, width x height")
    sv.add_argument("--max-texts", type=int, default=16, help="most expressions per request")
    sv.add_argument("--max-text-chars", type=int, default=500, help="longest expression, in characters")
    sv.set_defaults(func=_cmd_serve)

    ex = sub.add_parser("export", help="export a model for other runtimes")
    ex_sub = ex.add_subparsers(dest="what", required=True)
    onnx = ex_sub.add_parser("onnx", help="ONNX graph (image, text ids, padding mask -> logits) for onnxruntime")
    onnx.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    onnx.add_argument("-o", "--out", default="model.onnx", help="the .onnx file to write")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.set_defaults(func=_cmd_export_onnx)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (UserError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"sharedris {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
