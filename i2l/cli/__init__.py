"""`i2l` command line: one subcommand per module of this package (file name = command, `_` -> `-`). Each module:
a docstring (its help), `add_arguments(parser)` and `main(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

# Offline by default: nothing may be downloaded, and a hub lookup must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def add_preset_args(p: argparse.ArgumentParser) -> None:
    """The shared `--preset P` and `--set section.field=value` options."""
    p.add_argument("--preset", default="toy", help="config preset: debug, toy (default), klein4b, zimage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--data-root", default=None, help="data root (default: data/, or I2L_DATA_ROOT)")


def add_baseline_training_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that train a baseline (mean LoRA, adapter) on the prepared train split."""
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data dir (train split)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the predictor's budget)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def train_baseline(args: argparse.Namespace, train, name: str) -> int:
    """Run `train(cfg, data, out, steps=, device=)` from the baseline options and print what it reached."""
    info = train(config_from_args(args), args.data, args.out, steps=args.steps, device=args.device)
    print(f"{name}: loss {info['first_loss']:.4f} -> {info['last_loss']:.4f} in {info['steps']} steps "
          f"({info['seconds']:.0f}s) -> {info['dir']}")
    return 0


def config_from_args(args: argparse.Namespace):
    """The preset with its overrides on the data root, its toy models' paths resolved there (once, here)."""
    from i2l.config import get_config
    from i2l.layout import resolve_paths

    cfg = get_config(args.preset, args.overrides)
    root = args.data_root or os.environ.get("I2L_DATA_ROOT")
    if root:
        cfg.data_root = root
    return resolve_paths(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="i2l",
        description="i2l: predict style LoRAs from reference images in one forward pass, and run the "
        "pipeline that trains, mass-produces and evaluates them. Every command runs on the toy world "
        "by default (--preset toy) and on real checkpoints with --preset klein4b / zimage.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"i2l.cli.{info.name}")
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(info.name.replace("_", "-"), help=doc.splitlines()[0] if doc else None,
                           description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # User errors: say what is wrong and what to do, without a traceback.
        print(f"i2l {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
