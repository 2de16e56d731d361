"""Build a run's report: reports/<run>/index.html (self-contained) and report.md.

Table 1 (best bold, second underlined), a grid of references and each method's output, the amortization
plot, the held-out gain by noise level, ablations (number of references, asymmetric CFG), training curve,
benchmarks and the data summary.
Without --run: the latest top-level run that has evaluation samples.
"""

from pathlib import Path

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--run", default=None, metavar="ID", help="run id (default: latest run with samples)")
    p.add_argument("--db", default=None, help="results store (default: <data-root>/results.duckdb)")
    p.add_argument("--out", default=None, help="output directory (default: $I2L_REPORTS_DIR/<run>, else reports/<run>)")
    p.add_argument("--grid-rows", type=int, default=3, help="styles shown in the sample grid")


def main(args):
    from i2l.report.build import build_report
    from i2l.store import Store, store_path

    cfg = config_from_args(args)
    db = Path(args.db) if args.db else store_path(cfg)
    store = Store(db, read_only=True)
    roots = list(dict.fromkeys([db.parent.resolve(), cfg.root.resolve()]))  # images only from here
    index = build_report(store, args.run, args.out, image_roots=roots, grid_rows=args.grid_rows)
    print(f"report: {index} and {index.with_name('report.md')}")
    return 0
