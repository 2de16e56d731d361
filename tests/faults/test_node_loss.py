"""A Ray worker NODE lost mid-job on a real two-node cluster on this machine (head: 1 CPU, worker node: 1 CPU, so
each of the job's 2 actors sits on its own node): `i2l produce` and `i2l prepare` joined to it by RAY_ADDRESS
finish with every output exactly once. The node dies while its actor is inside a call (frozen there, then the
raylet and every process of the node are SIGKILLed), so that call's work is lost with it and must be redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from raynodes import RayCluster, ray_env, wait_for

REPO = Path(__file__).resolve().parents[2]
STYLES = 12  # LoRAs to make in produce: a handful, batches of one style, so that the lost node holds a call


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(head_cpus=1)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def victim(cluster):
    """A worker node (1 CPU) that joins for one test and is lost in it (killed again at the end if it is not)."""
    node = cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    try:
        yield node
    finally:
        node.kill()


def run_losing_node(cluster, node, args: list[str], title: str, log: Path) -> tuple[subprocess.CompletedProcess,
                                                                                     float]:
    """Run `i2l <args>` on the cluster; once the node's actor is executing `title`, freeze it there and lose the
    node. Returns the finished command and the seconds it took after the node was lost."""
    env = {**ray_env(), "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "i2l.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker = wait_for(lambda: node.executing(title), proc, log)
        worker.suspend()  # mid-call: what it was doing is lost with the node
        assert node.kill() >= 2, "the raylet and the actor's worker"
        t = time.monotonic()
        rc = proc.wait(300)
        return subprocess.CompletedProcess(args, rc, log.read_text()), time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(30)


def manifest_of_styles(prepared: Path, out: Path, n: int) -> Path:
    """A validation manifest of n styles (the references of the prepared ones, in turn) beside a copy of the val
    shards: n LoRAs to make, and styles sharing references must get byte-identical files whichever actor made them."""
    shutil.copytree(prepared / "val", out / "val")
    entries = [json.loads(line) for line in (prepared / "val_manifest.jsonl").read_text().splitlines()]
    lines = [json.dumps({**entries[i % len(entries)], "style_id": f"f{i:03d}", "sample_id": f"v{i:06d}"})
             for i in range(n)]
    (out / "val_manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out / "val_manifest.jsonl"


@pytest.mark.slow
def test_node_lost_mid_produce_every_lora_exactly_once(debug_run, cluster, victim, tmp_path):
    from i2l.io import file_sha256
    from i2l.produce.catalog import GRAY_FILE, read_catalog
    from i2l.store import Store

    manifest = manifest_of_styles(debug_run.prepared_dir, tmp_path / "data", STYLES)
    out, db = tmp_path / "loras", tmp_path / "results.duckdb"
    done, after_s = run_losing_node(
        cluster, victim, ["produce", "--preset", "debug", "--checkpoint", str(debug_run.run_dir), "--manifest",
                          str(manifest), "--out", str(out), "--db", str(db), "--workers", "2", "--batch-size", "1",
                          "--no-progress"], "LoRAProducer.make", tmp_path / "produce.log")
    assert done.returncode == 0, done.stdout[-3000:]
    assert after_s < 120, f"took {after_s:.0f} s after the node was lost"
    rows = read_catalog(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("styles/*.safetensors")) + [GRAY_FILE]
    assert sorted(r["path"] for r in rows) == sorted(files), "catalog rows = files"
    assert Counter(r["style_id"] for r in rows) == Counter([f"f{i:03d}" for i in range(STYLES)] + [None])
    for r in rows:
        assert r["sha256"] == file_sha256(out / r["path"]), r["path"]
    # the same references make the same weights on any actor: the redone call's LoRA equals its twins'
    by_refs: dict[str, set[bytes]] = {}
    for line in manifest.read_text().splitlines():
        e = json.loads(line)
        by_refs.setdefault(json.dumps(e["reference_ids"]), set()).add(weights(out / f"styles/{e['style_id']}.safetensors"))
    assert all(len(w) == 1 for w in by_refs.values()), "a LoRA differs from another of the same references"
    store = Store(db, read_only=True)
    assert sorted(store.rows("SELECT lora_id, sha256 FROM loras")) == sorted((r["lora_id"], r["sha256"]) for r in rows)


def weights(path: Path) -> bytes:
    """A safetensors file's tensors (names and bytes), without its metadata (which names the style)."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    return b"".join(name.encode() + tensors[name].tobytes() for name in sorted(tensors))


def prepared_rows(prepared: Path) -> dict[str, list[str]]:
    """Row ids per split of a prepared directory's finished shards, and of its quarantine."""
    got = {split: [i for p in sorted((prepared / split).glob("part-*.parquet"))
                   for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()] for split in ("train", "val")}
    q = prepared / "quarantine.parquet"
    got["quarantine"] = sorted(map(str, pq.read_table(q).to_pylist())) if q.is_file() else []
    return got


@pytest.mark.slow
def test_node_lost_mid_prepare_every_row_exactly_once(debug_run, cluster, victim, tmp_path):
    out = tmp_path / "prepared"
    done, after_s = run_losing_node(
        cluster, victim, ["prepare", "--preset", "debug", "--input", str(debug_run.toyworld_dir), "--out", str(out),
                          "--workers", "2", "--no-progress"], "UnitRunner.run", tmp_path / "prepare.log")
    assert done.returncode == 0, done.stdout[-3000:]
    assert after_s < 120, f"took {after_s:.0f} s after the node was lost"
    got, want = prepared_rows(out), prepared_rows(debug_run.prepared_dir)
    for split in ("train", "val"):
        assert max(Counter(got[split]).values()) == 1, f"a {split} row written twice"
        assert sorted(got[split]) == sorted(want[split]), split
    assert got["quarantine"] == want["quarantine"]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == json.loads((debug_run.prepared_dir / "manifest.json").read_text())["counts"]
