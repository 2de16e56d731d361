"""Run the whole job as the Prefect `pipeline` flow (or one flow with --flow), then print the report's path.

Stages: toy world -> prepared shards (Ray) -> toy backbone, encoder and scorer -> predictor training (Ray Train)
-> mass-produced LoRAs (Ray actors) -> evaluation -> report. Finished stages are skipped by what the results
store says, so a re-run repeats no work and a killed run resumes (training from its latest checkpoint);
--force STAGE runs one again. Prints a per-stage timing summary.

Prefect: with PREFECT_API_URL set, the runs are recorded on that server; otherwise a temporary local server
is started (~15 s) with its database under <data-root>/prefect/ (set PREFECT_HOME to use your own profile).
Ray: with RAY_ADDRESS set, the Ray work runs on that cluster; otherwise on a local Ray started on demand.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from i2l.cli import add_preset_args, config_from_args

FLOW_NAMES = ("pipeline", "prepare_data", "pretrain_toy", "train", "produce", "evaluate", "report")


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--flow", choices=FLOW_NAMES, default="pipeline", help="flow to run (default: pipeline)")
    p.add_argument("--input", default=None, metavar="DIR",
                   help="MegaStyle-layout input directory (default: the preset's toy world)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="run this stage again even if it is done (repeatable), e.g. --force evaluate")
    p.add_argument("--reports-dir", default=None, help="reports root (default: reports/, or I2L_REPORTS_DIR)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def flow_parameters(args, data_root: str) -> dict:
    """The chosen flow's parameters: a preset + overrides, and the few options that flow takes."""
    params = {"preset": args.preset, "overrides": list(args.overrides), "data_root": data_root,
              "progress": not args.no_progress, "force": list(args.force)}
    if args.flow in ("pipeline", "prepare_data"):
        if args.input:
            from i2l.data.megastyle import find_shards

            if Path(args.input).is_file():
                raise NotADirectoryError(f"--input {args.input} is a file: pass a MegaStyle-layout directory")
            find_shards(args.input)  # parquet footers only: a wrong --input fails before Prefect and Ray start
        params["input_dir"] = args.input
    elif args.input:
        raise ValueError(f"--input applies to the pipeline and prepare_data flows, not {args.flow}")
    if args.flow in ("pipeline", "report", "evaluate"):
        params["reports_dir"] = args.reports_dir
    return params


def use_local_prefect(data_root: str) -> None:
    """No Prefect server configured: keep the temporary server's database with the data, not in ~/.prefect
    (concurrent runs on one machine would otherwise share, and lock, one SQLite file)."""
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        home = Path(data_root) / "prefect"
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates its home but not the data root above it
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its first start creates the database: on a busy 2-core machine that can take longer than the default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def print_summary(stages: list[dict], wall_s: float) -> None:
    print(f"\n{'stage':<20}{'status':<10}{'seconds':>9}")
    for s in stages:
        status, secs = ("skipped", "-") if s["skipped"] else ("ran", f"{s['seconds']:.1f}")
        # a stage that trained beside another: the table's seconds are its wait after that one, not its own
        beside = s["info"].get("trained_beside") if not s["skipped"] else None
        note = f"  (trained beside {beside}: {s['info'].get('seconds', 0):.1f} s of its own)" if beside else ""
        print(f"{s['stage']:<20}{status:<10}{secs:>9}{note}")
    print(f"{'stages':<30}{sum(s['seconds'] for s in stages):>9.1f}")
    print(f"{'wall (with start-up)':<30}{wall_s:>9.1f}")


def main(args):
    t0 = time.perf_counter()
    cfg = config_from_args(args)  # a bad preset or override fails here, before any start-up
    data_root = str(Path(cfg.data_root).resolve())
    params = flow_parameters(args, data_root)
    use_local_prefect(data_root)
    from flows import load_flow  # imports Prefect: after its settings are in the environment

    result = load_flow(args.flow)(**params)
    stages = result["stages"] if isinstance(result, dict) else result
    print_summary(stages, time.perf_counter() - t0)
    report = result.get("report") if isinstance(result, dict) else next(
        (s["info"].get("index") for s in stages if s["stage"] == "report"), None)
    if report:
        print(f"\nreport: {report}")
    return 0
