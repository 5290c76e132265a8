"""Command line: ``python -m captioner <command> ...`` (thin: parses, then calls the API)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=["greedy", "beam", "sample"],
                   help="default: the run's decode.strategy (beam when --beam-size > 1)")
    p.add_argument("--beam-size", type=int, help="beam width K")
    p.add_argument("--n-best", type=int, help="hypotheses kept per image (beam search)")
    p.add_argument("--length-penalty", type=float, help="GNMT alpha (0 = none)")
    p.add_argument("--temperature", type=float, help="sampling temperature")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--max-length", type=int, help="maximum tokens per sequence")
    p.add_argument("--batch-size", type=int, help="images per compiled call")


def _decode_args(args: argparse.Namespace) -> dict:
    out = {k: getattr(args, k) for k in ("strategy", "beam_size", "n_best", "length_penalty",
                                         "temperature", "top_k", "max_length", "batch_size")
           if getattr(args, k) is not None}
    if "strategy" not in out and out.get("beam_size", 1) > 1:
        out["strategy"] = "beam"
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=(
        "Show, Attend and Tell image-to-sequence models: captions or SMILES, with attention."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (resumes an existing run directory)")
    p.add_argument("--config", help="YAML config; optional when --run-dir holds a run")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>)")
    _add_overrides(p)

    p = sub.add_parser("caption", help="caption images with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--out", help="write results to a .jsonl or .csv file")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    _add_decode(p)

    p = sub.add_parser("attention", help="per-token attention figures and an HTML page")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (PNGs and index.html)")
    _add_decode(p)

    p = sub.add_parser("evaluate", help="decode a split and write metrics and predictions")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", help="config YAML or manifest (default: the run's own data)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="at most this many images")
    p.add_argument("--metrics", choices=["caption", "smiles"], help="default: by tokenizer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--report", action="store_true",
                   help="also write index.html: every image with its attention, sortable")
    _add_decode(p)

    p = sub.add_parser("extract-features",
                       help="run a frozen backbone once over every image into data.feature_cache")
    p.add_argument("--config", required=True, help="YAML config with data.feature_cache set")
    _add_overrides(p)

    p = sub.add_parser("render-molecules", help="draw SMILES into PNGs plus a manifest")
    p.add_argument("--smiles", required=True, help="CSV with a SMILES column")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--augment", action="store_true", help="seeded drawing-style augmentation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N rows")
    p.add_argument("--sample", type=int, help="a random N rows (seeded by --seed)")
    p.add_argument("--column", default="smiles", help="name of the SMILES column")
    p.add_argument("--selfies", action="store_true", help="add a SELFIES column")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")

    p = sub.add_parser("demo", help="shapes data -> train -> caption -> metrics (runs/demo)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--config", help="config (default: configs/shapes.yaml)")
    _add_overrides(p)

    p = sub.add_parser("bench", help="train/decode throughput on random grids, one JSON line")
    from captioner.bench import add_bench_arguments

    add_bench_arguments(p)

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=6000, help="number of images")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.train.trainer import Trainer

    if args.config is None and not (args.run_dir and Path(args.run_dir, "config.json").is_file()):
        raise SystemExit("train: give --config, or a --run-dir that holds a run to resume")
    cfg_path = args.config or Path(args.run_dir, "config.json")
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    cfg = load_config(cfg_path, args.overrides)
    trainer = Trainer(cfg, run_dir)  # a multi_worker non-chief writes into a subfolder
    history = trainer.fit()
    print(f"run directory: {trainer.run_dir} ({len(history.get('epoch', []))} epochs)")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from captioner.generate.captioner import Captioner, expand_images, write_results

    cap = Captioner.load(args.run, args.checkpoint)
    paths = expand_images(args.images)
    gen = cap.generate(paths, **_decode_args(args))
    records = gen.records(cap.tokenizer)
    if args.out:
        write_results(records, args.out)
        print(f"{len(records)} images -> {args.out}", file=sys.stderr)
    elif args.json:
        for rec in records:
            print(json.dumps(rec))
    else:
        for rec in records:
            print(f"{rec['image']}\t{rec['text']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.evaluate.runs import evaluate

    evaluate(args.run, args.out, data=args.data, split=args.split, limit=args.limit,
             metrics=args.metrics, report=args.report, **_decode_args(args))
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md, predictions.csv")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from captioner.generate.captioner import expand_images
    from captioner.viz.attention import write_attention

    write_attention(args.run, expand_images(args.images), args.out, **_decode_args(args))
    return 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.train.feature_cache import extract_for_config

    cache = extract_for_config(load_config(args.config, args.overrides))
    print(f"{len(cache.paths)} grids of shape {cache.grid_shape} in {cache.dir}")
    return 0


def cmd_render_molecules(args: argparse.Namespace) -> int:
    from captioner.data.molecules import render_molecules

    summary = render_molecules(args.smiles, args.out, size=args.size, augment=args.augment,
                               seed=args.seed, limit=args.limit, workers=args.workers,
                               smiles_column=args.column, selfies=args.selfies,
                               sample=args.sample)
    cached = " (already rendered)" if summary.cached else ""
    print(f"rendered {summary.rendered} molecules{cached}, skipped {len(summary.skipped)}; "
          f"manifest: {summary.manifest}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.demo import default_config_path, run_demo

    cfg = load_config(args.config or default_config_path(), args.overrides)
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
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "caption": cmd_caption, "evaluate": cmd_evaluate,
                "attention": cmd_attention, "bench": cmd_bench,
                "demo": cmd_demo, "make-shapes": cmd_make_shapes,
                "render-molecules": cmd_render_molecules,
                "extract-features": cmd_extract_features}
    from captioner.config import ConfigError
    from captioner.data.manifests import DataError

    try:
        return commands[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
