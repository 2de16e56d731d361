"""Deployments: prefect.yaml has one deployment per flow with parameters the flow takes; `make deploy` refuses
without a server; against a real local `prefect server start`, a deployed flow run by a process worker completes
and its results land in the results store."""

from __future__ import annotations

import inspect
import subprocess

import pytest
import yaml
from servers import BIN, REPO, prefect_env


def test_prefect_yaml_has_a_deployment_per_flow():
    from flows import FLOWS, load_flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deps = {d["entrypoint"]: d for d in spec["deployments"]}
    for name, entrypoint in FLOWS.items():
        assert entrypoint in deps, f"no deployment for flow {name}"
        d = deps[entrypoint]
        assert d["work_pool"]["name"] == "i2l-process"
        accepted = set(inspect.signature(load_flow(name).fn).parameters)
        assert set(d.get("parameters") or {}) <= accepted, f"{d['name']}: parameters the flow does not take"
    schedules = {d["name"]: d.get("schedules") or [] for d in spec["deployments"]}
    assert schedules["evaluate"] and schedules["prepare-data"], "nightly evaluation and weekly data refresh"
    from prefect.client.schemas.schedules import CronSchedule

    for d, items in schedules.items():
        for s in items:
            CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))  # raises on a bad cron


def test_deploy_refuses_without_a_server(tmp_path):
    r = subprocess.run([str(REPO / "infra/prefect/deploy.sh")], cwd=REPO, env=prefect_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "PREFECT_API_URL" in r.stderr


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker(prefect_server, tmp_path):
    """On the session's `prefect server start` (conftest.py), with a Prefect home of this test's own."""
    url, env = prefect_server.api_url, prefect_server.env(tmp_path / "prefect-home")
    root = tmp_path / "data"

    def run(*cmd, timeout=600, cwd=REPO):
        r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout

    run(str(REPO / "infra/prefect/deploy.sh"), "--name", "prepare-data")  # = make deploy, for one deployment
    out = run(str(BIN / "prefect"), "deployment", "run", "prepare_data/prepare-data", "--param", "preset=debug",
              "--param", f"data_root={root}")
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    # The worker starts elsewhere: the deployment's pull step must put the flow run in this repository.
    run(str(BIN / "prefect"), "worker", "start", "--pool", "i2l-process", "--run-once", cwd=tmp_path)

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    assert state.is_completed(), state

    from i2l.config import get_config
    from i2l.store import Store

    store = Store(root / "results.duckdb", read_only=True)
    styles = get_config("debug").toyworld.styles  # the debug toy world: 8 valid rows per style, none quarantined
    assert store.rows("SELECT rows_written, rows_quarantined FROM datasets") == [(8 * styles, 0)]
    assert dict(store.rows("SELECT kind, status FROM runs")) == {"toyworld": "ok", "prepare": "ok"}
    assert (root / "prepared" / "debug" / "manifest.json").is_file()
