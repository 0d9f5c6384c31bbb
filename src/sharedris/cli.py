"""The `sharedris` command line. Each subcommand parses its flags, then calls library code.

Errors a user can cause surface as one sentence on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from sharedris.devices import DEVICE_HELP, resolve_device
from sharedris.precision import PRECISIONS
from sharedris.runtime import (
    DEFAULT_DEVICE,
    DEFAULT_PRECISION,
    DEFAULT_PRESENCE_THRESHOLD,
    DEFAULT_RUNTIME,
    RUNTIMES,
)

RUNTIME_HELP = ("what runs the model: torch; openvino (CPU, fp32/bf16; conversions are cached); or auto = openvino "
                "on a CPU at fp32/bf16 when the openvino package is installed (the fastest path measured on CPUs), "
                "else torch")
PRECISION_HELP = ("numeric precision: auto = bf16 where the hardware runs it fast (CUDA GPUs with bf16, CPUs "
                  "with AMX or AVX-512-BF16), else fp32; int8 = dynamic int8 linear layers (CPU only)")


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit code 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, or an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def iter_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subcommand parser below it, with its full name ("sharedris bench model")."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from iter_parsers(child)


def _out_dir(path: str) -> Path:
    """The output folder ``path``, created now, so that a bad path fails before any model work."""
    from sharedris.checkpoint import FolderError, writable_dir

    try:
        return writable_dir(path, "output folder")
    except FolderError as e:
        raise UserError(f"{e}; pass another folder with -o") from None


def _check_port(host: str, port: int) -> None:
    """Fail with one sentence unless ``host:port`` can be bound now (uvicorn binds it later)."""
    if not 0 <= port <= 65535:
        raise UserError(f"port {port} is out of range; use a port from 0 to 65535")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as e:
        reason = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({(e.strerror or str(e)).lower()})"
        raise UserError(f"{host}:{port} {reason}; pick another --port or --host") from None


def _probability(text: str) -> float:
    try:
        value = float(text)
        in_range = 0.0 <= value <= 1.0
    except ValueError:
        in_range = False
    if not in_range:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


API_KEY_ENV = "SHAREDRIS_API_KEY"  # the service's key, when --api-key is not given
PRESENCE_HELP = ("an expression whose presence probability (that anything in the image matches it) is below this "
                 "matches nothing: 'no match', an empty mask")


def _name_list(text: str) -> list[str]:
    """``"a,b,"`` -> ``["a", "b"]``: a comma-separated list option (empty items dropped)."""
    return [x for x in text.split(",") if x]


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in _name_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_bench_model(args: argparse.Namespace) -> None:
    from sharedris.benchmark import bench_models, bench_training, concrete_precisions, cpu_description
    from sharedris.precision import resolve_precision

    precisions = concrete_precisions(args.precision)  # an unknown name fails here, before any model work
    named = [r for r in RUNTIMES if r != "auto"]
    if not args.runtime:
        raise UserError(f"no runtime given; list one or more of {', '.join(named)}")
    for runtime in args.runtime:
        if runtime == "auto":
            raise UserError(f"bench times the runtimes it is given by name; list one or more of {', '.join(named)}")
        if runtime not in named:
            raise UserError(f"unknown runtime {runtime!r}; choose one of {', '.join(named)}")
    print(cpu_description())
    print(f"precisions: {', '.join(precisions)} (auto runs {resolve_precision('auto', 'cpu')} on this CPU); "
          f"{args.threads} threads, median of {args.runs} runs, throughput at batch {args.batch}", flush=True)
    rows = bench_models(args.models, runs=args.runs, threads=args.threads, throughput_batch=args.batch,
                        precisions=precisions, runtimes=args.runtime)
    print(f"{'model':<16} {'params':>9} {'encoder':>9} {'GFLOPs':>8} {'precision':>13} {'latency':>9} {'x fp32':>7} "
          f"{'head':>6} {'img/s':>7} {'x fp32':>7} {'peak RSS':>9}")
    for name, r in rows.items():
        for precision, p in r["precisions"].items():
            ratios = [f"x{p[key]:.2f}" if key in p else "-" for key in ("latency_speedup", "throughput_speedup")]
            head = "-" if p["head_share"] is None else f"{p['head_share'] * 100:5.1f}%"
            print(f"{name:<16} {r['params'] / 1e6:8.1f}M {r['encoder_params'] / 1e6:8.1f}M {r['gflops']:8.1f} "
                  f"{precision:>13} {p['latency_s'] * 1000:7.0f}ms {ratios[0]:>7} {head:>6} "
                  f"{p['throughput']:7.2f} {ratios[1]:>7} {r['peak_rss_mb']:7.0f}MB")
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
    from sharedris.train.config import load_train_config
    from sharedris.train.loop import train

    device = None if args.device is None else resolve_device(args.device)
    if device is not None and device.index is not None:
        raise UserError(f"train places each rank on cuda:LOCAL_RANK; pass --device {device.type}, not {args.device}")
    cfg = load_train_config(args.config, args.overrides)
    out = train(cfg, resume=args.resume, device=None if device is None else device.type)
    if os.environ.get("RANK", "0") == "0":
        print(f"run folder: {out}")


def _load_model(name: str, device: str):
    from sharedris.modeling.pretrained import load_pretrained

    return load_pretrained(name, device=device)


def _log_precision(args: argparse.Namespace, precision: str, runtime: str, device) -> None:
    """One line on stderr saying which precision and runtime run (``auto`` resolves per machine), and where."""
    precision = f"auto -> {precision}" if args.precision == "auto" else precision
    runtime = f"auto -> {runtime}" if args.runtime == "auto" else runtime
    print(f"precision: {precision}, runtime: {runtime}, on {device}", file=sys.stderr)


def _cmd_predict(args: argparse.Namespace) -> None:
    from sharedris import bulk

    device = resolve_device(args.device)
    if args.manifest is None and bulk.is_single_image(args.image):
        if not args.text:
            raise UserError("give at least one expression with -t")
        return _predict_one(args, args.image[0], device)
    if args.manifest is not None and (args.image or args.text):
        raise UserError("--manifest rows name their own images and expressions; drop the images and -t")
    if args.manifest is None and not args.image:
        raise UserError("give an image, several images, a folder, a glob pattern or --manifest FILE")
    if args.manifest is None and not args.text:
        raise UserError("give at least one expression with -t; it applies to every image")
    _predict_bulk(args, device)


def _predict_one(args: argparse.Namespace, image_path: str, device: torch.device) -> None:
    """One image: mask and overlay PNGs named from each phrase, a line (or JSON) per phrase.

    A phrase that matches nothing (``matched`` false: the predictor's "no match", an empty mask)
    gets no mask file, only its overlay: the picture greyed under a "no match" label.
    """
    from sharedris.data.images import load_image
    from sharedris.predictor import Predictor
    from sharedris.render import answer_record, png_names, save_pngs, unknown_words_line
    from sharedris.text import validate_texts

    validate_texts(args.text)  # before any model work
    image = load_image(image_path)
    out = _out_dir(args.out_dir)
    predictor = Predictor(_load_model(args.model, device), device=device, precision=args.precision,
                          presence_threshold=args.presence_threshold, runtime=args.runtime)
    _log_precision(args, predictor.precision, predictor.runtime, device)
    pred = predictor.predict(image, args.text)
    warning = unknown_words_line(args.model, predictor.description, pred.unknown_words)
    if warning:
        print(warning, file=sys.stderr)
    results = []
    for n, (text, (mask_png, overlay_png)) in enumerate(zip(args.text, png_names(Path(image_path).stem, args.text))):
        results.append({**answer_record(text, pred, n), **save_pngs(image, pred, n, text, out / mask_png,
                                                                     out / overlay_png)})
    if args.json:
        print(json.dumps({"image": image_path, "height": image.height, "width": image.width, "results": results}))
    else:
        for r in results:
            if r["matched"]:
                print(f"{r['score']:.3f}  {r['text']!r} (presence {r['present']:.2f}) -> {r['mask_png']}, "
                      f"{r['overlay_png']}")
            else:
                print(f"no match  {r['text']!r} (presence {r['present']:.2f}) -> {r['overlay_png']}")


def _predict_bulk(args: argparse.Namespace, device: torch.device) -> None:
    """Many images or a manifest: results.jsonl (and errors.jsonl) in the output folder, rerunnable."""
    from sharedris.bulk import ResultsMismatch, image_rows, predict_manifest, read_manifest
    from sharedris.distributed import cleanup_distributed
    from sharedris.precision import resolve_precision
    from sharedris.render import unknown_words_line
    from sharedris.runtime import resolve_runtime

    manifest = read_manifest(args.manifest if args.manifest is not None else image_rows(args.image, args.text))
    out = _out_dir(args.out_dir)
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        model = _load_model(args.model, "cpu")
        if main_rank:
            precision = resolve_precision(args.precision, device)
            _log_precision(args, precision, resolve_runtime(args.runtime, precision, device), device)
        # the model itself, not a Predictor: its weights identify the results (run.json), whatever the runtime
        summary = predict_manifest(model, manifest, out, device=device, precision=args.precision,
                                   presence_threshold=args.presence_threshold, runtime=args.runtime,
                                   batch_size=args.batch_size, workers=args.workers, lanes=args.lanes,
                                   save_png=args.save_png, fresh=args.fresh)
    except ResultsMismatch as e:
        raise UserError(e.sentence("--fresh")) from None
    finally:
        cleanup_distributed()
    if not main_rank:
        return
    warning = unknown_words_line(args.model, model.description, [summary.unknown_words])
    if warning:
        print(warning, file=sys.stderr)
    if args.json:
        print(json.dumps({"written": summary.written, "reused": summary.reused, "recomputed": summary.recomputed,
                          "failed": summary.failed, "results": str(summary.results), "errors": str(summary.errors),
                          "unknown_words": list(summary.unknown_words)}))
    else:
        print(f"{summary.written} new pair(s) written, {summary.reused} reused, {summary.recomputed} recomputed, "
              f"{summary.failed} row(s) failed -> {summary.results}")
    if summary.failed:
        raise UserError(f"{summary.failed} row(s) failed; their reasons are in {summary.errors}")


GENERATOR_SAMPLES, HELDOUT_SAMPLES = 1200, 300  # eval --num-samples defaults: per split, per variant


def _heldout_variants(args: argparse.Namespace) -> list[str]:
    """The held-out variants to score, after refusing the options that do not apply to them."""
    from sharedris.data.heldout import VARIANTS

    if args.dataset != "synthetic":
        raise UserError(f"--renderer heldout draws synthetic scenes; it cannot score --dataset {args.dataset}")
    for flag, value in (("--split", args.split), ("--styles", args.styles), ("--world", args.world),
                        ("--synthetic-image-size", args.synthetic_image_size)):
        if value is not None:
            raise UserError(f"{flag} does not apply to --renderer heldout, which draws its own variants "
                            f"(choose them with --variants)")
    unknown = [v for v in args.variants or () if v not in VARIANTS]
    if unknown or args.variants == []:
        raise UserError(f"unknown held-out variant(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose among {', '.join(VARIANTS)}")
    return list(args.variants or VARIANTS)


def _cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from sharedris.data.config import DataConfig
    from sharedris.data.registry import build_source
    from sharedris.evaluate import evaluate
    from sharedris.metrics import format_table

    heldout = args.renderer == "heldout"
    variants = _heldout_variants(args) if heldout else []
    if args.variants is not None and not heldout:
        raise UserError("--variants chooses variants of the held-out renderer; add --renderer heldout")
    if args.styles and args.world != "flat":
        raise UserError("--styles chooses the backgrounds of the flat world; add --world flat")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load_model(args.model, device)
    cfg = model.config
    if heldout:  # each variant is scored like a split: one source per variant, of --num-samples scenes
        runs = [(v, DataConfig(synthetic_renderer="heldout", synthetic_heldout_variant=v, seed=args.seed,
                               synthetic_eval_size=args.num_samples or HELDOUT_SAMPLES), "test") for v in variants]
    else:
        data = DataConfig(dataset=args.dataset, root=args.root, split_by=args.split_by,
                          synthetic_image_size=args.synthetic_image_size or cfg.image_size,
                          synthetic_eval_size=args.num_samples or GENERATOR_SAMPLES, seed=args.seed,
                          **({"synthetic_world": args.world} if args.world else {}),
                          **({"synthetic_styles": args.styles} if args.styles else {}))
        runs = [(split, data, split) for split in args.split or ["test"]]
    rows, report = {}, {}
    for name, data, split in runs:
        source = build_source(data, split, train=False)
        res = evaluate(model, source, device=device, precision=args.precision, runtime=args.runtime,
                       presence_threshold=args.presence_threshold, batch_size=args.batch_size,
                       protocol=args.protocol, num_workers=args.workers)
        report[name] = res
        rows[name] = res["overall"]
        rows.update({f"{name}/{g}": m for g, m in res["groups"].items()})
    dataset = "synthetic (held-out renderer)" if heldout else args.dataset
    print(f"model {args.model}, dataset {dataset}, protocol {args.protocol}, precision {res['precision']}, "
          f"runtime {res['runtime']}, presence threshold {res['presence_threshold']}")
    print(format_table(rows))
    if args.out:  # held-out: always keyed by variant; splits: keyed when there are several
        keyed = heldout or len(report) > 1
        Path(args.out).write_text(json.dumps(report if keyed else next(iter(report.values())), indent=2))


def _cmd_serve(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    try:
        import uvicorn

        from sharedris.serve.app import Batching, Limits, check_api_key, create_app
    except ImportError:
        raise UserError("install the serve extra: pip install 'sharedris[serve]'") from None

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_texts=args.max_texts, max_text_chars=args.max_text_chars)
    batching = Batching(wait_ms=args.batch_wait_ms, max_batch=args.max_batch)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None:
        try:
            check_api_key(api_key)
        except ValueError as e:  # its sentence names the rule, never the key
            given = "--api-key" if args.api_key is not None else API_KEY_ENV
            raise UserError(f"{given}: {e}") from None
    _check_port(args.host, args.port)
    app = create_app(args.model, limits=limits, device=device, precision=args.precision,
                     presence_threshold=args.presence_threshold, runtime=args.runtime, batching=batching,
                     api_key=api_key)
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


def _cmd_fetch_weights(args: argparse.Namespace) -> None:
    from sharedris.fetch import cache_dir, fetch_weights

    weights, tokenizer = fetch_weights(args.model, cache_dir(args.dir), args.url or ())
    print(f"weights:   {weights}\ntokenizer: {tokenizer}")
    print("train with them (see docs/real-photos.md):\n"
          f"  torchrun --nproc_per_node=N -m sharedris train --config configs/refcoco_{args.model.split('_')[-1]}.yaml "
          f"encoder_weights={weights} tokenizer={tokenizer} data.root=DATA_ROOT")


def _cmd_fetch_data(args: argparse.Namespace) -> None:
    from pathlib import Path

    from sharedris.fetch import fetch_data

    root = Path(args.root)
    missing = fetch_data(args.dataset, root, args.url or (), skip_images=args.skip_images, keep_archives=args.keep_archives)
    if missing:
        raise UserError(f"{', '.join(missing)} missing" + (" (see the manual step above)" if args.dataset == "grefcoco"
                                                          else ""))
    if not (root / "images" / "train2014").is_dir():
        print(f"annotations ready in {root / args.dataset}; images/train2014 not fetched (--skip-images)")
    else:  # the same check as `sharedris data check`, with its defaults
        check = build_parser().parse_args(["data", "check", "--root", str(root), "--dataset", args.dataset])
        check.func(check)


def _inference_options() -> argparse.ArgumentParser:
    """The options of every command that runs a model (predict, eval, serve), with the library's defaults."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("inference options (the same for predict, eval and serve)")
    group.add_argument("--device", default=DEFAULT_DEVICE,
                       help=DEVICE_HELP + " (bulk prediction under torchrun: each rank takes cuda:LOCAL_RANK)")
    group.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION, help=PRECISION_HELP)
    group.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME, help=RUNTIME_HELP)
    group.add_argument("--presence-threshold", type=_probability, default=DEFAULT_PRESENCE_THRESHOLD,
                       help=PRESENCE_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    from sharedris import __version__
    from sharedris.data.registry import DATASETS

    parser = argparse.ArgumentParser(prog="sharedris", description="Single-encoder referring image segmentation.")
    parser.add_argument("--version", action="version", version=f"sharedris {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure speed")
    bench_sub = bench.add_subparsers(dest="what", required=True)
    enc = bench_sub.add_parser("encoder", help="time the BEiT-3 encoder (optionally against torchscale)")
    enc.add_argument("--model", choices=["tiny", "base", "large"], default="base", help="BEiT-3 encoder size")
    enc.add_argument("--sizes", type=_int_list, default="224,480", help="image sizes, comma-separated")
    enc.add_argument("--runs", type=int, default=5, help="timed runs per size (the median is reported)")
    enc.add_argument("--batch", type=int, default=1, help="images per forward pass")
    enc.add_argument("--text-len", type=int, default=20, help="text tokens per image")
    enc.add_argument("--threads", type=int, default=2, help="torch threads")
    enc.add_argument("--reference", action="store_true",
                     help="also time torchscale's BEiT3 on identical weights (test extra)")
    enc.add_argument("--json", action="store_true", help="also print the rows as JSON")
    enc.set_defaults(func=_cmd_bench)
    bm = bench_sub.add_parser("model", help="size, GFLOPs, latency, throughput, memory per registered model")
    bm.add_argument("--models", type=_name_list,
                    default="sharedris_tiny,sharedris_base,sharedris_large",
                    help="comma-separated registered model names (randomly initialised)")
    bm.add_argument("--runs", type=int, default=3, help="timed runs per model (the median is reported)")
    bm.add_argument("--batch", type=int, default=8, help="batch size of the throughput measurement")
    bm.add_argument("--threads", type=int, default=2, help="torch threads")
    bm.add_argument("--precision", type=_name_list, default="fp32",
                    help="comma-separated precisions (fp32, bf16, int8, auto), timed alternately in one process; "
                         "ratios are against fp32 when it is listed")
    bm.add_argument("--runtime", type=_name_list, default="torch",
                    help="comma-separated runtimes (torch, openvino); openvino times fp32 and bf16 of the listed "
                         "precisions")
    bm.add_argument("--train-steps", type=int, default=10, help="steps of the tiny training measurement (0 = skip)")
    bm.add_argument("--json", action="store_true", help="also print the rows as JSON")
    bm.set_defaults(func=_cmd_bench_model)

    tr = sub.add_parser("train", help="train a model (one process, or one rank under torchrun)",
                        description="Train. Defaults come from sharedris.train.config.TrainConfig, then the YAML "
                                    "file, then key.sub=value overrides. Under torchrun every rank runs this.")
    tr.add_argument("--config", help="YAML file of config deltas (see configs/)")
    tr.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt if it exists")
    tr.add_argument("--device", default=None,
                    help="cpu or cuda (each rank takes cuda:LOCAL_RANK); default: cuda when available")
    tr.add_argument("overrides", nargs="*", help="key.sub=value, e.g. optim.lr=1e-4 epochs=3")
    tr.set_defaults(func=_cmd_train)

    inference = _inference_options()
    pr = sub.add_parser("predict", parents=[inference], help="segment what each expression refers to in an image, many images or a manifest",
                        description="One image: mask and overlay PNGs per expression. Several images, a folder, a "
                                    "glob pattern or --manifest: results.jsonl (COCO RLE masks) in the output "
                                    "folder; a rerun reuses the pairs already done; also under torchrun (see "
                                    "docs/bulk.md).",
                        epilog="An expression that matches nothing in the image (presence below "
                               "--presence-threshold, or not one pixel in its mask) prints 'no match' and gets no "
                               "mask PNG, only its overlay: the picture greyed under a 'no match' label; in --json its "
                               "matched is false, its mask_png null and its score 0. Words the "
                               "model never saw in training are named in one line on stderr.")
    pr.add_argument("image", nargs="*", help="image file(s) (any format Pillow reads), folder(s) of images or "
                                             "glob pattern(s)")
    pr.add_argument("-t", "--text", action="append", help="an expression, applied to every image; repeat for more")
    pr.add_argument("--manifest", default=None, help="JSON Lines (image, texts, id) or CSV (image,text[,id]) file "
                                                     "of rows to segment, instead of images and -t")
    pr.add_argument("-o", "--out-dir", default="predictions",
                    help="where to write mask and overlay PNGs (one image) or results.jsonl and errors.jsonl")
    pr.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    pr.add_argument("--batch-size", type=int, default=16,
                    help="bulk: (image, expression) pairs per forward pass, from several images")
    pr.add_argument("--workers", type=int, default=None,
                    help="bulk: image decoding processes (0 = in this one; default: up to 2 on cores the model "
                         "does not use, so none on a CPU machine whose cores all run torch threads)")
    pr.add_argument("--lanes", type=int, default=None,
                    help="bulk: batches in the model at once, sharing torch's threads (default: 2 on a CPU with "
                         "2 or more torch threads, 1 on a GPU or with --runtime openvino)")
    pr.add_argument("--save-png", action="store_true", help="bulk: also write mask and overlay PNGs per pair")
    pr.add_argument("--fresh", action="store_true",
                    help="bulk: delete the output folder's earlier results (results.jsonl, replaced.jsonl, run.json) "
                         "and start afresh; without it a rerun reuses the pairs already done and refuses a folder "
                         "made with another model, precision, runtime or presence threshold")
    pr.add_argument("--json", action="store_true", help="print results (COCO RLE masks, scores, presence) as JSON; "
                                                       "bulk: the summary")
    pr.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("eval", parents=[inference], help="oIoU / mIoU / Prec@X on a dataset split")
    ev.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    ev.add_argument("--dataset", choices=list(DATASETS), default="synthetic",
                    help="synthetic scenes, or a refer-format dataset under --root")
    ev.add_argument("--split", type=_name_list, default=None,
                    help="comma-separated splits, e.g. val,testA,testB (default: test; not with --renderer heldout)")
    ev.add_argument("--root", default=None, help="refer-format data root (or $SHAREDRIS_DATA)")
    ev.add_argument("--split-by", default=None, help="refer annotation split: unc, umd or google "
                                                       "(default: the dataset's usual one)")
    ev.add_argument("--protocol", choices=["original", "resized"], default="original",
                    help="score at each image's original size, or LAVT's 480x480")
    ev.add_argument("--num-samples", type=int, default=None,
                    help="synthetic: samples per split (default 1,200: the six families take turns, 200 each) "
                         "or, with --renderer heldout, per variant (default 300)")
    ev.add_argument("--renderer", choices=["generator", "heldout"], default="generator",
                    help="synthetic: the scenes training uses (generator), or an independent held-out renderer "
                         "for evaluation only (heldout; see docs/evaluation.md)")
    ev.add_argument("--variants", type=_name_list, default=None,
                    help="--renderer heldout: comma-separated variants among few, lone, crowded, pastel, jpeg, "
                         "wide, tall (default: all), each scored like a split")
    ev.add_argument("--world", choices=["varied", "flat"], default=None,
                    help="synthetic: the generator's world (default: varied, what the default model was last "
                         "trained on; flat: the first recipes' scenes)")
    ev.add_argument("--styles", type=lambda s: tuple(_name_list(s)), default=None,
                    help="synthetic, --world flat: background styles drawn per scene, comma-separated, among "
                         "texture, plain, gradient, stripes (default: texture)")
    ev.add_argument("--synthetic-image-size", type=int, default=None, help="synthetic: scene size (default: model size)")
    ev.add_argument("--seed", type=int, default=0, help="synthetic: dataset seed")
    ev.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    ev.add_argument("--workers", type=int, default=0, help="data loader worker processes (0 = load in this one)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ev.add_argument("--out", default=None, help="write the metrics as JSON here")
    ev.set_defaults(func=_cmd_eval)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dc = data_sub.add_parser("check", help="check a refer-format data root (files, images, masks, counts)")
    dc.add_argument("--root", required=True, help="folder holding refcoco/, refcoco+/, refcocog/, grefcoco/ and images/")
    dc.add_argument("--dataset", default=None, help="refcoco, refcoco+, refcocog or grefcoco (default: every one present)")
    dc.add_argument("--split-by", default=None, help="unc, umd or google (default: every refs file present)")
    dc.add_argument("--image-root", default=None, help="default: <root>/images/train2014")
    dc.set_defaults(func=_cmd_data_check)
    dt = data_sub.add_parser("tokenizer", help="train the small tokenizer of models trained from scratch (tiny.spm)")
    dt.add_argument("-o", "--out", required=True, help="output .spm file")
    dt.add_argument("--vocab-size", type=int, default=511, help="pieces (ids = pieces + 1)")
    dt.add_argument("--scenes", type=int, default=3000, help="synthetic training scenes to read expressions from")
    dt.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    dt.set_defaults(func=_cmd_data_tokenizer)

    _add_serve_parser(sub, inference)

    ex = sub.add_parser("export", help="export a model for other runtimes")
    ex_sub = ex.add_subparsers(dest="what", required=True)
    onnx = ex_sub.add_parser("onnx", help="ONNX graph (image, text ids, padding mask -> logits) for onnxruntime")
    onnx.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    onnx.add_argument("-o", "--out", default="model.onnx", help="the .onnx file to write")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    onnx.set_defaults(func=_cmd_export_onnx)
    fe = sub.add_parser("fetch", help="download official BEiT-3 weights or refer datasets")
    fe_sub = fe.add_subparsers(dest="fetch_command", required=True)
    url_help = "NAME=URL: download file NAME from URL instead (a mirror); repeatable"
    fw = fe_sub.add_parser("weights", help="BEiT-3 checkpoint and beit3.spm tokenizer into a cache folder")
    fw.add_argument("model", help="beit3_base or beit3_large")
    fw.add_argument("--dir", default=None, help="cache folder (default: $SHAREDRIS_HOME or ~/.cache/sharedris)")
    fw.add_argument("--url", action="append", metavar="NAME=URL", help=url_help)
    fw.set_defaults(func=_cmd_fetch_weights)
    fd = fe_sub.add_parser("data", help="refer annotations and COCO train2014 images, unpacked and checked")
    fd.add_argument("dataset", help="refcoco, refcoco+, refcocog or grefcoco")
    fd.add_argument("--root", required=True, help="data root: gets <dataset>/, images/train2014/ and downloads/")
    fd.add_argument("--skip-images", action="store_true", help="fetch annotations only, not train2014.zip (13 GB)")
    fd.add_argument("--keep-archives", action="store_true", help="keep the downloaded zips in <root>/downloads/")
    fd.add_argument("--url", action="append", metavar="NAME=URL", help=url_help)
    fd.set_defaults(func=_cmd_fetch_data)
    for _, p in iter_parsers(parser):
        p.formatter_class = _HelpFormatter
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      inference: argparse.ArgumentParser) -> None:
    """``sharedris serve``: its options, documented in docs/http-api.md."""
    sv = sub.add_parser("serve", parents=[inference], help="HTTP API (POST /v1/segment, GET /healthz), demo page at /, API docs at /docs",
                        description="The HTTP service (docs/http-api.md): POST /v1/segment, GET /v1/model, GET "
                                    "/healthz, a demo page at / and the API's interactive documentation at /docs, "
                                    "served from the service itself (no internet needed). Concurrent requests share the "
                                    "model's forward passes (--batch-wait-ms, --max-batch). With a key "
                                    f"({API_KEY_ENV} or --api-key) every route but /healthz needs it; the key is "
                                    "never logged.")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    sv.add_argument("--model", default="default", help="'default' or a checkpoint folder")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest image file accepted")
    sv.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image, width x height")
    sv.add_argument("--max-texts", type=int, default=16, help="most expressions per request")
    sv.add_argument("--max-text-chars", type=int, default=500, help="longest expression, in characters")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long a request waits for others to share its forward pass (0: only those "
                         "already waiting share it); requests arriving while the model is busy share the next one")
    sv.add_argument("--max-batch", type=int, default=16,
                    help="most expressions in one forward pass; a request is never split, so one with more runs "
                         "alone (1: one request at a time)")
    sv.add_argument("--api-key", default=None,
                    help=f"require this key on every route but /healthz (as 'Authorization: Bearer KEY'; browsers "
                         f"ask for it: any user name, the key as the password). Prefer the {API_KEY_ENV} "
                         "environment variable: a command line is visible to other users of the machine")
    sv.set_defaults(func=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (UserError, OSError, ValueError, ImportError) as e:
        print(f"sharedris {args.command}: error: {_sentence(e)}", file=sys.stderr)
        sys.exit(2)


def _sentence(e: Exception) -> str:
    """The one-line message of ``e``; an OS error from a system call is named by its path, not its errno."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror.lower()}"
    return str(e)
