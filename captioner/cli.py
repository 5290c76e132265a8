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
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--max-length", type=int, help="maximum tokens per caption")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")

    p = sub.add_parser("demo", help="shapes data -> train -> caption -> metrics (runs/demo)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--config", help="config (default: configs/shapes.yaml)")
    _add_overrides(p)

    p = sub.add_parser("make-shapes", help="generate the synthetic shapes dataset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=6000, help="number of images")
    p.add_argument("--size", type=int, default=112, help="image side in pixels")
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.training import train

    if args.config is None and not (args.run_dir and Path(args.run_dir, "config.json").is_file()):
        raise SystemExit("train: give --config, or a --run-dir that holds a run to resume")
    cfg_path = args.config or Path(args.run_dir, "config.json")
    run_dir = args.run_dir or Path("runs") / Path(args.config).stem
    cfg = load_config(cfg_path, args.overrides)
    history = train(cfg, run_dir)
    print(f"run directory: {run_dir} ({len(history.get('epoch', []))} epochs)")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from captioner.inference import Captioner

    cap = Captioner.load(args.run, args.checkpoint)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"caption: no such image file: {', '.join(missing)}")
    gen = cap.generate(args.images, max_length=args.max_length)
    if args.json:
        for rec in gen.records(cap.tokenizer):
            print(json.dumps(rec))
    else:
        for name, text in zip(gen.images, gen.texts):
            print(f"{name}\t{text}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from captioner.config import load_config
    from captioner.demo import default_config_path, run_demo

    cfg = load_config(args.config or default_config_path(), args.overrides)
    run_demo(args.run_dir, config=cfg)
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from captioner.shapes import generate_shapes

    path = generate_shapes(args.out, args.n, args.size, max_objects=args.max_objects,
                           seed=args.seed)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_tensorflow()
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "caption": cmd_caption, "demo": cmd_demo,
                "make-shapes": cmd_make_shapes}
    from captioner.config import ConfigError
    from captioner.data import DataError

    try:
        return commands[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"captioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
