"""Command line: ``python -m captioner <command> ...`` (thin: parses, then calls the API).

Building the parser imports nothing heavy (the allowed values come from
:mod:`captioner.choices`), so ``captioner --help`` and ``captioner CMD --help`` answer
without loading TensorFlow; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from captioner import __version__
from captioner.choices import Choices


def tensorflow_environment() -> None:
    """Defaults TensorFlow reads when it loads (a value the user set wins): C++ logging
    quiet, and oneDNN's CPU kernels on (``TF_ENABLE_ONEDNN_OPTS=1``), which TensorFlow
    turns on by itself, on Linux, only for CPUs with VNNI, bfloat16 or AMX instructions
    (README, "Speed", "oneDNN on every CPU": the convolutional train step is faster with
    it on a CPU without them too). Call it before TensorFlow is first imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=Choices().decode_strategy,
                   help="default: the run's decode.strategy (beam when --beam-size > 1)")
    p.add_argument("--beam-size", type=int, help="beam width K")
    p.add_argument("--n-best", type=int, help="hypotheses kept per image (beam search)")
    p.add_argument("--length-penalty", type=float, help="GNMT alpha (0 = none)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--max-length", type=int, help="maximum tokens per sequence")
    p.add_argument("--batch-size", type=int, help="images per compiled call")
    p.add_argument("--rescore-views", type=_views, metavar="VIEW,...", help=(
        "beam search: rank the candidates by their log-probability summed over the picture "
        f"seen in these views ({', '.join(Choices().rescore_view)}; e.g. "
        "identity,rot90,rot180,rot270; 'none' for the beam's own order; default: the run's "
        "decode.rescore_views)"))
    p.add_argument("--margin-views", type=_margins, metavar="MARGIN,...", help=(
        "read each picture file cut to its ink at these margins (e.g. "
        "0.05,0.1,0.15,0.2,0.25), then rank what the union of the readings' candidates names "
        "by their probability at every margin; 'none' for one reading; default: the run's "
        "decode.margin_views"))


def _margins(text: str) -> tuple[float, ...]:
    """``--margin-views`` value: comma-separated distinct margins >= 0, or ``none``."""
    if text.strip().lower() == "none":
        return ()
    try:
        margins = tuple(float(m) for m in text.split(",") if m.strip())
    except ValueError:
        margins = ()
    if not margins or min(margins) < 0 or len(set(margins)) < len(margins):
        raise argparse.ArgumentTypeError(f"margins must be distinct numbers >= 0, e.g. "
                                         f"0.05,0.1,0.15; got {text!r}")
    return margins


def _views(text: str) -> tuple[str, ...]:
    """``--rescore-views`` value: comma-separated views, or ``none``."""
    if text.strip().lower() == "none":
        return ()
    views = tuple(v.strip() for v in text.split(",") if v.strip())
    allowed = Choices().rescore_view
    unknown = [v for v in views if v not in allowed]
    if unknown or not views:
        raise argparse.ArgumentTypeError(f"views must be among {', '.join(allowed)}; got "
                                         f"{text!r}")
    return views


def _crop_margin(text: str) -> float | str | None:
    """``--crop-margin`` value: a margin >= 0, ``none`` (whole pictures) or ``run`` (the
    run's ``decode.crop_margin``, the default)."""
    if text.lower() in ("none", "run"):
        return None if text.lower() == "none" else "run"
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'none', got {text}")
    return value


def _add_crop(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crop-margin", type=_crop_margin, default="run",
                   help="read each picture cut to its ink plus this margin (a fraction of "
                        "the ink's longer side, e.g. 0.15; for drawings on white), or 'none' "
                        "for whole pictures (default: the run's decode.crop_margin)")


def _decode_args(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in ("strategy", "beam_size", "n_best", "length_penalty",
                                         "temperature", "top_k", "max_length", "batch_size",
                                         "rescore_views", "margin_views")
           if getattr(args, k) is not None}
    if "strategy" not in out and out.get("beam_size", 1) > 1:
        out["strategy"] = "beam"
    return out


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags; :func:`captioner.bench.bench_from_args` runs them.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_bench_arguments(p)
        >>> p.parse_args(["--impl", "classic", "--steps", "5"]).impl
        'classic'
    """
    choices = Choices()
    p.add_argument("--impl", choices=choices.bench_impl, default=choices.bench_impl[0])
    p.add_argument("--precision", choices=choices.precision, default=choices.precision[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=49, help="grid cells G (a square: 49, 64)")
    p.add_argument("--feature-dim", type=int, default=1280, help="backbone channels C")
    p.add_argument("--embedding-dim", type=int, default=256)
    p.add_argument("--units", type=int, default=512)
    p.add_argument("--attention-units", type=int, help="default: --units")
    p.add_argument("--vocab-size", type=int, help="output vocabulary (default 5000; 40 with "
                   "--config)")
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="timed train steps")
    p.add_argument("--attend", choices=choices.attend, default=choices.attend[0])
    p.add_argument("--attention-kernel", choices=choices.attention_kernel,
                   default=choices.attention_kernel[0],
                   help="additive attention as the fused CPU kernel or TensorFlow ops")
    p.add_argument("--end-to-end", action="store_true",
                   help="also time image decoding, backbones and the feature-cache pipeline")
    p.add_argument("--classic-decode-images", type=int, default=2,
                   help="images decoded one by one for the classic greedy rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help=(
        "instead: time this config's whole train step from pictures (its backbone in the "
        "step; --steps, --seed, --vocab-size and --set apply) and, for data.format smiles, "
        "drawing its data.path molecules"))
    _add_overrides(p)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (cheap: no TensorFlow, no command module imported)."""
    choices = Choices()
    parser = argparse.ArgumentParser(prog="captioner", description=(
        "Show, Attend and Tell image-to-sequence models: captions or SMILES, with attention."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "YAML config: a file, or a built-in name (shapes, flickr8k, smiles_qm9, ...)"

    p = sub.add_parser("train", help="train a model (resumes an existing run directory)")
    p.add_argument("--config", help=f"{config_help}; optional when --run-dir holds a run")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    _add_overrides(p)

    p = sub.add_parser("recalibrate", help=(
        "recompute a trained run's batch-norm statistics for its final weights (what "
        "train.precise_bn_batches does at each validation), validate, save a checkpoint"))
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--batches", type=int, default=16,
                   help="training batches of the last epoch to average (default 16)")
    _add_overrides(p)

    p = sub.add_parser("caption", help="caption images with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--out", help="write results to a .jsonl or .csv file")
    p.add_argument("--checkpoint", choices=choices.checkpoint, default=choices.checkpoint[0])
    _add_crop(p)
    _add_decode(p)

    p = sub.add_parser("attention", help="per-token attention figures and an HTML page")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (PNGs and index.html)")
    _add_crop(p)
    _add_decode(p)

    p = sub.add_parser("evaluate", help="decode a split and write metrics and predictions")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", help="config YAML or manifest (default: the run's own data)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--metrics", choices=choices.metric_family, help="default: by tokenizer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--report", action="store_true",
                   help="also write index.html: every image with its attention, sortable")
    p.add_argument("--compare", action="append", choices=choices.compare, default=[],
                   help="also read the same images with this program and score it beside "
                        "the model (SMILES; repeatable; skipped if not installed)")
    p.add_argument("--style", choices=choices.drawing_style,
                   help="draw the split's molecules in this style into OUT/images and "
                        "evaluate those pictures (data.format smiles: always drawn, by "
                        "default in data.drawing.eval_style)")
    p.add_argument("--size", type=int,
                   help="side of the drawn pictures in pixels (default: data.drawing.eval_size)")
    p.add_argument("--draw-seed", type=int, default=0,
                   help="seed of the drawing style's random choices")
    _add_crop(p)
    _add_decode(p)

    p = sub.add_parser("extract-features",
                       help="run a frozen backbone once over every image into data.feature_cache")
    p.add_argument("--config", required=True, help=f"{config_help}, with data.feature_cache")
    _add_overrides(p)

    p = sub.add_parser("render-molecules", help="draw SMILES into PNGs plus a manifest")
    p.add_argument("--smiles", required=True, help="CSV with a SMILES column")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--augment", action="store_true", help="seeded drawing-style augmentation")
    p.add_argument("--style", choices=choices.drawing_style,
                   help="draw every molecule in one named style (RDKit, Indigo, Open Babel "
                        "defaults, thin rotated lines, or the training mix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--sample", type=int, help="a random N rows (seeded by --seed)")
    p.add_argument("--column", default="smiles", help="name of the SMILES column")
    p.add_argument("--selfies", action="store_true", help="add a SELFIES column")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")

    p = sub.add_parser("demo", help="shapes data -> train -> caption -> metrics (runs/demo)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--config", help=f"{config_help} (default: shapes)")
    _add_overrides(p)

    p = sub.add_parser("bench", help=("train/decode throughput on random grids, or a config's "
                                      "train step from pictures (--config); one JSON line"))
    add_bench_arguments(p)

    p = sub.add_parser("export", help="write a TensorFlow SavedModel (TF Serving layout)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="export folder; the model goes into OUT/<n>")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--beam-size", type=int, default=3, help="K of the serving_beam signature")
    p.add_argument("--length-penalty", type=float, default=0.0, help="GNMT alpha of beam search")
    p.add_argument("--max-length", type=int, help="maximum tokens (default: the run's)")
    p.add_argument("--checkpoint", choices=choices.checkpoint, default=choices.checkpoint[0])
    _add_crop(p)

    p = sub.add_parser("serve", help="HTTP endpoint with batching and a page to try a model")
    _add_serve_source(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32,
                   help="images decoded together at most (1: no batching)")
    p.add_argument("--window-ms", type=float, default=10.0,
                   help="how long the first waiting image waits for others")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=64_000_000,
                   help="largest image (width x height), checked before decoding")
    p.add_argument("--access-log", action="store_true", help="log one line per request")
    _add_crop(p)
    _add_decode(p)

    p = sub.add_parser("bench-serve",
                       help="load-test 'serve' on loopback: requests/s, p50/p99, batching on/off")
    _add_serve_source(p)
    p.add_argument("images", nargs="+", help="images to send (files, folders or globs)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=128, help="requests per client count")
    p.add_argument("--max-batch", type=int, default=32, help="the batched server's batch")
    p.add_argument("--json", action="store_true", help="print JSON lines, not a table")

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=6000, help="number of images")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return parser


def _add_serve_source(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory (decodes with the Captioner)")
    source.add_argument("--export", help="folder written by 'captioner export' (SavedModel)")


def cmd_export(args: argparse.Namespace) -> int:
    from captioner.generate.export import ExportOptions, export_run

    options = ExportOptions(max_length=args.max_length or 0, beam_size=args.beam_size,
                            length_penalty=args.length_penalty, checkpoint=args.checkpoint)
    path = export_run(args.run, args.out, options, args.version, args.crop_margin)
    print(f"SavedModel written to {path} (signatures serving_default, serving_beam, "
          "serving_pixels)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from captioner.data.images import ImageLimits
    from captioner.serve.app import ServeOptions, serve
    from captioner.serve.backends import ExportBackend, RunBackend
    from captioner.serve.batching import BatchingOptions

    decode = _decode_args(args)
    if args.export and decode:
        raise ValueError("decoding flags apply to --run; an export decodes as it was exported")
    backend = (ExportBackend(args.export, args.crop_margin) if args.export
               else RunBackend(args.run, crop_margin=args.crop_margin, **decode))
    options = ServeOptions(max_body_bytes=int(args.max_body_mb * 1_000_000),
                           image_limits=ImageLimits(max_pixels=args.max_pixels),
                           batching=BatchingOptions(args.max_batch, args.window_ms))
    serve(backend, args.host, args.port, options, args.access_log)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from captioner.generate.captioner import expand_images
    from captioner.serve.loadtest import bench_serve, markdown_table

    source = ["--export", args.export] if args.export else ["--run", args.run]
    rows = bench_serve(source, [Path(p) for p in expand_images(args.images)], args.clients,
                       args.requests, args.max_batch)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(markdown_table(rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.config import load_config

    if args.config is None and not (args.run_dir and Path(args.run_dir, "config.json").is_file()):
        raise SystemExit("train: give --config, or a --run-dir that holds a run to resume")
    cfg_path = args.config or Path(args.run_dir, "config.json")
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    cfg = load_config(cfg_path, args.overrides)  # config errors before TensorFlow loads
    from captioner.train.trainer import Trainer

    trainer = Trainer(cfg, run_dir)  # a multi_worker non-chief writes into a subfolder
    history = trainer.fit()
    print(f"run directory: {trainer.run_dir} ({len(history.get('epoch', []))} epochs)")
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    from captioner.config import load_config

    cfg = load_config(Path(args.run, "config.json"), args.overrides)
    from captioner.train.trainer import Trainer

    record = Trainer(cfg, args.run).recalibrate(args.batches)

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    best = " (best)" if record["best"] else ""
    print(f"batch-norm statistics from {record['batches']} batches: val_loss "
          f"{fmt(record['val_loss'])} {record['val_metric_name']} {fmt(record['val_metric'])}"
          f"{best} -> {record['checkpoint']}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption every usable image; an unusable one is reported on stderr (``skipped
    <path>: <reason>: <detail>``) and as a record with an ``error`` in --json / --out.
    Exit status 0 when at least one image was captioned, 1 when none could be."""
    from captioner.generate.captioner import Captioner, expand_images, write_results

    cap = Captioner.load(args.run, args.checkpoint, crop_margin=args.crop_margin)
    paths = expand_images(args.images)
    gen = cap.generate(paths, on_error="skip", **_decode_args(args))
    for path, err in gen.failures:
        print(f"captioner caption: skipped {path}: {err.reason}: {err.detail}", file=sys.stderr)
    by_path = {r["image"]: r for r in gen.records(cap.tokenizer) + gen.error_records()}
    records = [by_path[p] for p in paths if p in by_path]  # the order given
    if args.out:
        write_results(records, args.out)
        print(f"{len(gen.texts)} images -> {args.out}"
              + (f" ({len(gen.failures)} skipped)" if gen.failures else ""), file=sys.stderr)
    elif args.json:
        for rec in records:
            print(json.dumps(rec))
    else:
        for rec in records:
            if "error" not in rec:
                print(f"{rec['image']}\t{rec['text']}")
    return 0 if gen.texts else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluate.runs import evaluate

    evaluate(args.run, args.out, data=args.data, split=args.split, limit=args.limit,
             metrics=args.metrics, report=args.report, compare=args.compare,
             style=args.style, size=args.size, draw_seed=args.draw_seed,
             crop_margin=args.crop_margin, **_decode_args(args))
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md, predictions.csv")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from captioner.generate.captioner import expand_images
    from captioner.viz.attention import write_attention

    write_attention(args.run, expand_images(args.images), args.out,
                    crop_margin=args.crop_margin, **_decode_args(args))
    return 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from captioner.config import load_config

    cfg = load_config(args.config, args.overrides)
    from captioner.train.feature_cache import extract_for_config

    cache = extract_for_config(cfg)
    print(f"{len(cache.paths)} grids of shape {cache.grid_shape} in {cache.dir}")
    return 0


def cmd_render_molecules(args: argparse.Namespace) -> int:
    if args.style:
        return _render_style(args)
    from captioner.data.molecules import render_molecules

    summary = render_molecules(args.smiles, args.out, size=args.size, augment=args.augment,
                               seed=args.seed, limit=args.limit, workers=args.workers,
                               smiles_column=args.column, selfies=args.selfies,
                               sample=args.sample)
    cached = " (already rendered)" if summary.cached else ""
    print(f"rendered {summary.rendered} molecules{cached}, skipped {len(summary.skipped)}; "
          f"manifest: {summary.manifest}")
    return 0


def _render_style(args: argparse.Namespace) -> int:
    """render-molecules --style NAME: every SMILES drawn in one named style."""
    from captioner.data.drawing import render_smiles
    from captioner.data.molecules import read_smiles_csv, sample_rows

    if args.augment or args.selfies:
        raise ValueError("--style draws one named style: it does not combine with "
                         "--augment (use --style mix) or --selfies")
    rows = sample_rows(read_smiles_csv(args.smiles, args.column, args.limit), args.sample,
                       args.seed)
    summary = render_smiles([smiles for _, _, smiles in rows], args.out, args.size,
                            args.style, args.seed, lines=[line for _, line, _ in rows])
    print(f"drew {summary.rendered} molecules in style {args.style}, skipped "
          f"{len(summary.skipped)} (listed in skipped.csv); manifest: {summary.manifest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from captioner.config import load_config

    cfg = load_config(args.config or "shapes", args.overrides)
    from captioner.demo import run_demo

    run_demo(args.run_dir, config=cfg)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from captioner.bench import bench_from_args

    print(json.dumps(bench_from_args(args)))
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from captioner.data.shapes import generate_shapes

    path = generate_shapes(args.out, args.n, args.size, max_objects=args.max_objects,
                           seed=args.seed)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    tensorflow_environment()
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "recalibrate": cmd_recalibrate, "caption": cmd_caption,
                "evaluate": cmd_evaluate, "attention": cmd_attention, "bench": cmd_bench,
                "demo": cmd_demo, "make-shapes": cmd_make_shapes,
                "render-molecules": cmd_render_molecules,
                "extract-features": cmd_extract_features, "export": cmd_export,
                "serve": cmd_serve, "bench-serve": cmd_bench_serve}
    try:
        return commands[args.command](args)
    # ConfigError, DataError and ChoiceError are ValueErrors: caught without importing
    # captioner.data.manifests (TensorFlow) for commands that never load data.
    except (ValueError, FileNotFoundError) as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
