"""Run one read-only SQL query on the results store and print the result.

Examples:
  i2l query "SELECT * FROM v_method_summary WHERE metric = 'overall' ORDER BY mean DESC"
  i2l query --format csv "SELECT * FROM v_benchmarks" > benchmarks.csv
Views: v_method_summary, v_style_breakdown, v_amortization, v_benchmarks, v_data_summary,
v_quarantine_by_reason.
"""

from pathlib import Path

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("sql", help="one SQL statement (the store is opened read-only)")
    p.add_argument("--db", default=None, help="results store (default: <data-root>/results.duckdb)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    p.add_argument("--max-rows", type=int, default=200, help="rows printed in table format (0: all)")


def main(args):
    import pandas as pd

    from i2l.store import Store, store_path
    from i2l.store.queries import user_query

    cfg = config_from_args(args)
    store = Store(Path(args.db) if args.db else store_path(cfg), read_only=True)
    df = user_query(store, args.sql)
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records", date_format="iso", indent=1))
    elif df.empty:
        print(f"(no rows; columns: {', '.join(map(str, df.columns))})")
    else:
        with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
            limit = args.max_rows or len(df)
            print(df.head(limit).to_string(index=False))
            if len(df) > limit:
                print(f"... {len(df) - limit} more rows (use --max-rows 0 or --format csv)")
    return 0
