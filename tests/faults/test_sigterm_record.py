"""A SIGTERMed stage is on record as failed even when its process dies while it unwinds: a worker's cancel SIGTERMs
the whole process group, Ray's daemons stop at the same moment, and a driver was seen to die before its unwinding
reached the store, which then said 'running' for ever (CI, 2026-12-05)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys, time
    import flows.stages as stages

    stages.get_run_logger = lambda: logging.getLogger("i2l.tests")  # no Prefect flow run around the stage
    ctx = stages.StageContext.open("debug", [], sys.argv[1], progress=False)

    def work(run_id):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            os._exit(3)  # dead before the exception reaches the store's own failure record

    ctx.run_stage("train", "k1", lambda: False, work)
""")


def test_a_stage_killed_while_unwinding_is_recorded_failed(tmp_path):
    from i2l.store import Store

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                       text=True, check=False, timeout=120)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    store = Store(tmp_path / "results.duckdb", read_only=True)
    assert store.rows("SELECT status FROM runs WHERE run_id = 'train-debug-k1'") == [("failed",)], r.stderr[-2000:]


CLI_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from i2l.cli import main
    from i2l.infer.api import I2L

    def load(*args, **kwargs):  # the first thing `i2l evaluate` does inside its store run
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            os._exit(3)  # dead before the exception reaches the store's own failure record

    I2L.load = load
    main(sys.argv[1:])
""")


def test_a_command_killed_while_unwinding_has_its_run_recorded_failed(debug_run, tmp_path):
    """The same for a plain command: `i2l evaluate` records its run and then dies mid-unwind."""
    from i2l.store import Store

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled"}
    store = tmp_path / "results.duckdb"
    r = subprocess.run([sys.executable, "-c", CLI_SCRIPT, "evaluate", "--preset", "debug", "--data-root",
                        str(debug_run.data_root), "--checkpoint", str(debug_run.run_dir), "--data",
                        str(debug_run.prepared_dir), "--store", str(store), "--out", str(tmp_path / "eval")],
                       cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    rows = Store(store, read_only=True).rows("SELECT kind, status FROM runs")
    assert rows == [("eval", "failed")], r.stderr[-2000:]
