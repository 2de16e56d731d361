"""`i2l` command line: one subcommand per module of this package (file name = command, `_` -> `-`). Each module:
a docstring (its help), `add_arguments(parser)` and `main(args) -> int`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import signal
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like the commands' own errors (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="i2l",
        description="i2l: predict style LoRAs from reference images in one forward pass, and run the "
        "pipeline that trains, mass-produces and evaluates them. Every command runs on the toy world "
        "by default (--preset toy) and on real checkpoints with --preset klein4b / zimage.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"i2l.cli.{info.name}")
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(info.name.replace("_", "-"), help=doc.splitlines()[0] if doc else None,
                           description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        # Also after the command (`i2l query --debug ...`); SUPPRESS keeps a top-level --debug.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
        p.set_defaults(_run=mod.main)
    return parser


# Exceptions that mean the user named a wrong file or value (exit 2); anything else is a failure (exit 1).
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)


def _library(e: BaseException) -> str:
    """The top-level package that defined the exception's class (or a base of it): duckdb, safetensors, ray."""
    for cls in type(e).__mro__:
        top = cls.__module__.split(".")[0].lstrip("_")
        if top in ("duckdb", "safetensors", "ray", "pickle"):
            return top
    return ""


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return " ".join(lines)


def explain(e: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception a command raised: the known library errors get what
    to do; the rest say their type and point to --debug."""
    lib, msg = _library(e), _one_line(e)
    if type(e).__name__ == "StoreBusyError":
        return 1, msg
    if lib == "safetensors" and "while serializing" in msg:
        return 2, f"cannot write a .safetensors file ({msg}): make --out name a file in a writable directory"
    if lib == "safetensors":
        return 2, (f"not a readable .safetensors file ({msg}): pass a LoRA or checkpoint file that i2l wrote; "
                   "this one is truncated, pickled or of another format")
    if lib == "pickle":
        return 2, f"not a readable checkpoint file ({msg}): pass a file that i2l wrote; this one is damaged"
    if lib == "duckdb":
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the later lines quote the SQL
        if "not a valid DuckDB database" in msg or "Is a directory" in msg:
            return 2, f"{reason}; pass a results store written by i2l (--db / --store)"
        return 1, f"results store: {reason}"
    if lib == "ray":
        return 1, (f"Ray failed ({type(e).__name__}: {msg.split(' Traceback')[0][:300]}); check the worker "
                   "logs (ray logs / /tmp/ray/session_latest/logs), free resources or lower --workers")
    if isinstance(e, _USER_ERRORS):
        return 2, msg or type(e).__name__
    return 1, f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"


def _fail_open_runs() -> None:
    """`i2l.store.fail_open_runs`, when the command has used the store: a command that never did (most of the
    plain ones) has no run to mark, and a signal handler is no place to import DuckDB."""
    results = sys.modules.get("i2l.store.results")
    if results is not None:
        results.fail_open_runs()


@contextlib.contextmanager
def _library_bars_off(off: bool):
    """`--no-progress`: the libraries' own bars off too (transformers' "Loading weights", the Hub's), here and in
    the stages' child processes, which inherit the variable; they read it when imported, which none is yet. Put
    back afterwards: `main` also runs in-process (tests, notebooks)."""
    key = "HF_HUB_DISABLE_PROGRESS_BARS"
    before = os.environ.get(key)
    if off:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if off and before is None:
            os.environ.pop(key, None)
        elif off:
            os.environ[key] = before


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from i2l.cli._warnings import echo_warnings
    from i2l.cluster import spin_briefly, stop_ray
    from i2l.cluster.signals import Terminated, exit_by, signals_end_the_run, terminable

    spin_briefly()  # before torch loads: this process's CPU threads and its stages' children's
    signals_end_the_run()  # a SIGTERM / Ctrl-C that lands in a finalizer still ends the command
    try:
        # the library's warnings (a broken checkpoint skipped, ...) reach the user as `i2l CMD: warning: ...`
        # terminable: a SIGTERM unwinds the command (files closed, actors stopped), even from inside a Ray wait
        # on_receipt: the command's store runs are on record as failed even if the process dies while it unwinds
        with _library_bars_off(getattr(args, "no_progress", False)), echo_warnings(args.command), \
                terminable(on_signal=stop_ray, on_receipt=_fail_open_runs):
            return int(args._run(args) or 0)
    except Terminated as e:
        if args.debug:
            raise
        print(f"i2l {args.command}: terminated ({signal.Signals(e.signal).name})", file=sys.stderr)
        exit_by(e.signal)  # the shell sees a signalled program (status -15), as before Ray was started
        raise
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"i2l {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        # One line that names the file or setting and what to do; the traceback only with --debug.
        code, msg = explain(e)
        print(f"i2l {args.command}: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
