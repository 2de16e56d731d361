"""Run a benchmark (`i2l bench NAME ...`): print its table and store its figures in the results store.

Each benchmark measures its ratios side by side in one run, because these machines are noisy. Per-call costs
(lora, cfg, train-step, amortization's forwards and --random-init steps) are interleaved rounds with medians;
prepare and produce time one end-to-end run per case (start-up and finalize are part of a pipeline's cost), and
amortization runs each per-style optimisation once, until it reaches i2L's loss. NAME is a module of i2l/bench/.
"""

import importlib
import pkgutil


def _benches():
    import i2l.bench

    return sorted(m.name for m in pkgutil.iter_modules(i2l.bench.__path__) if not m.name.startswith("_"))


def add_arguments(p):
    sub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name in _benches():
        mod = importlib.import_module(f"i2l.bench.{name}")
        doc = (mod.__doc__ or "").strip()
        sp = sub.add_parser(name.replace("_", "-"), help=doc.splitlines()[0] if doc else None, description=doc)
        mod.add_arguments(sp)
        sp.add_argument("--store", default=None, help="results store (default: data/results.duckdb)")
        sp.add_argument("--no-store", action="store_true", help="print only; record nothing")
        sp.set_defaults(_bench_module=mod, _bench_name=name)


def device_label() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.machine()}x{__import__('os').cpu_count()}"


def main(args):
    import os
    from pathlib import Path

    from i2l.bench import format_rows

    mod, name = args._bench_module, args._bench_name
    store = None
    if not args.no_store:
        from i2l.store import Store

        root = getattr(args, "data_root", None) or os.environ.get("I2L_DATA_ROOT", "data")
        # opened (created or migrated, then closed) before the benchmark runs: a wrong --store fails at once,
        # not after minutes of measuring
        store = Store(args.store or Path(root) / "results.duckdb")
    rows = mod.run(args)
    print(format_rows(rows))
    if store is not None:
        n = store.record_benchmark(name, rows, device=device_label())  # a wide row holds several figures
        print(f"recorded {n} figures of bench {name!r} in {store.path}")
    return 0
