"""Cluster infra: the `ray up` config validates against Ray's schema, the KubeRay manifests and Dockerfile are
what the docs say, their entry points are valid `i2l` commands; and (slow) `ray start --head` + `ray job submit`
of the `produce` entry point runs on that cluster and fills the results store."""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from servers import free_ports, stop_group, wait_until_up

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INFRA = REPO / "infra"


def _ray_config(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_ray_cluster_yaml_validates():
    cfg = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    _ray_config(cfg)
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] >= 8 and gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}
    broken = {**cfg, "available_node_types": {**cfg["available_node_types"], "gpu_worker": {**gpu, "typo": 1}}}
    with pytest.raises(jsonschema.ValidationError):
        _ray_config(broken)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kuberay_manifests():
    from i2l.cli import build_parser

    manifests = {p.name: _docs(p)[0] for p in sorted((INFRA / "k8s").glob("*.yaml"))}
    kinds = {name: (m["apiVersion"], m["kind"]) for name, m in manifests.items()}
    assert kinds["raycluster.yaml"] == ("ray.io/v1", "RayCluster")
    assert kinds["rayjob-train.yaml"] == kinds["rayjob-produce.yaml"] == ("ray.io/v1", "RayJob")
    claim = manifests["pvc.yaml"]["metadata"]["name"]
    assert "ReadWriteMany" in manifests["pvc.yaml"]["spec"]["accessModes"]
    cluster = manifests["raycluster.yaml"]["spec"]
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {v["persistentVolumeClaim"]["claimName"] for v in gpu["volumes"] if "persistentVolumeClaim" in v} == {claim}
    assert manifests["rayjob-produce.yaml"]["spec"]["clusterSelector"]["ray.io/cluster"] == \
        manifests["raycluster.yaml"]["metadata"]["name"]
    parser = build_parser()
    for name, flow in (("rayjob-train.yaml", "train"), ("rayjob-produce.yaml", "produce")):
        argv = shlex.split(manifests[name]["spec"]["entrypoint"])
        assert argv[0] == "i2l"
        args = parser.parse_args(argv[1:])  # exits on an unknown command or option
        assert (args.command, args.flow, args.data_root) == ("run", flow, "/data")


def test_dockerfile_is_cuda_with_i2l_installed():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
    assert len(froms) == 1 and froms[0].startswith("nvidia/cuda:") and "cudnn" in froms[0]
    assert "python3.11" in text and "pip install --no-deps ." in text and "i2l --help" in text
    # Ray Train's controller looks at its workers more often than its 2-s default (the end of every training)
    assert "ENV RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5" in text
    for src in ("pyproject.toml", "i2l", "flows", "prefect.yaml"):
        assert (REPO / src).exists(), f"the Dockerfile copies {src}"


def test_docs_entry_points_are_valid_commands():
    """Every `ray job submit ... -- i2l ...` line of docs/cluster.md parses as an i2l command."""
    from i2l.cli import build_parser

    text = (REPO / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    cmds = [line.split(" -- ", 1)[1] for line in text.splitlines() if "ray job submit" in line and " -- " in line]
    assert {shlex.split(c)[1] for c in cmds} >= {"run", "train", "produce"}
    for c in cmds:
        argv = shlex.split(c)
        assert argv[0] == "i2l", c
        build_parser().parse_args(argv[1:])


# ---------- a real head node and a real job ----------

@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in a session of its own, with its own temp dir (so no other process's
    `ray.init()` finds it) and free ports; yields (job API URL, env); its process group is killed afterwards."""
    gcs, dash, client, agent, agent_grpc, rte, metrics, nm, om = free_ports(9)
    temp = Path("/tmp") / f"i2l-rj-{os.getpid()}-{dash}"  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rte),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--temp-dir", str(temp), "--disable-usage-stats"]
    with open(tmp_path / "ray-head.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_until_up(f"{url}/api/version", proc, tmp_path / "ray-head.log", "ray head")
        yield url, env
    finally:
        stop_group(proc, wait_s=60)  # --block ties the head's processes to this one (they die with it)
        shutil.rmtree(temp, ignore_errors=True)  # outside tmp_path (socket path length): left behind otherwise


@pytest.mark.slow
def test_ray_job_submit_produce(ray_head, debug_run, prefect_server, tmp_path):
    """The documented produce entry point (`i2l run --flow produce`) submitted as a Ray job: it joins the
    cluster through RAY_ADDRESS (no local Ray of its own), produces every LoRA and records them in the store."""
    url, env = ray_head
    root = tmp_path / "data"  # the i2l layout (i2l/layout.py) around the session's debug world
    for link, target in (("prepared/debug", debug_run.prepared_dir), ("toy", debug_run.data_root / "toy"),
                         ("runs/debug/train", debug_run.run_dir)):
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(target)
    # the job's own environment: the session's Prefect API and a Prefect home of its own
    job_env = {"PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    entry = [sys.executable, "-m", "i2l.cli", "run", "--flow", "produce", "--preset", "debug", "--data-root",
             str(root), "--no-progress", "--set", "produce.workers=1"]
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", url, "--runtime-env-json",
                        json.dumps({"env_vars": job_env}), "--", *entry],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    logs = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in logs, logs[-4000:]
    assert "Connecting to existing Ray cluster" in logs and "Started a local Ray instance" not in logs

    from i2l.produce.jobs import jobs_from_manifest
    from i2l.store import Store

    styles = {j.style_id for j in jobs_from_manifest(root / "prepared" / "debug" / "val_manifest.jsonl")}
    store = Store(root / "results.duckdb", read_only=True)
    made = {r[0] for r in store.rows("SELECT style_id FROM loras WHERE style_id IS NOT NULL")}
    assert made == styles
    assert store.rows("SELECT status FROM runs WHERE kind = 'produce'") == [("ok",)]
    out = next((root / "runs" / "debug" / "loras").iterdir())
    assert len(list((out / "styles").glob("*.safetensors"))) == len(styles) and (out / "gray.safetensors").is_file()
