"""SIGTERM to each Prefect stage in turn: `i2l run` on the debug preset is killed (its whole process group: the
flow, its local Ray, the actors and the training worker) as stage 1 starts, re-run and killed as stage 2 starts,
... then re-run to the end. Each kill: a non-zero exit within a minute, no process left, no file half-written at a
final name, the stage not marked done. The end: the same outputs as an uninterrupted run (started beside it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from servers import tagged

from flows.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ["train.steps=2", "train.ckpt_every=1", "train.backbone_steps=2", "encoder.pretrain_steps=2",
             "scorer.pretrain_steps=2", "eval.styles=2", "eval.optimize_budgets=1,2", "produce.workers=1"]
# stage -> what appears (under the data root, or the reports dir) when its work starts; in pipeline order. The
# scorer's work starts with the encoder's (flows/pretrain_toy.py): the kill at the encoder is the scorer's too.
STARTED = {"toyworld": "toyworld/debug", "prepare": "prepared/debug", "pretrain_backbone": "toy/debug/backbone",
           "pretrain_encoder": "toy/debug/encoder", "train": "runs/debug/train/ray_results",
           "produce": "runs/debug/loras", "evaluate": "runs/debug/eval", "report": "../reports"}
BESIDE = {"pretrain_encoder": ["pretrain_scorer"]}  # stages whose work runs beside the killed one's
ORDER = list(STAGES)
EXIT_S = 60  # a SIGTERMed run must be gone within this (Kubernetes gives 30 s by default; this machine is busy)


def command(root: Path) -> list[str]:
    return [sys.executable, "-m", "i2l.cli", "run", "--preset", "debug", "--data-root", str(root), "--reports-dir",
            str(root.parent / "reports"), "--no-progress", *[a for o in OVERRIDES for a in ("--set", o)]]


def start(root: Path, env: dict, log: Path) -> subprocess.Popen:
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(command(root), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def broken_files(base: Path) -> list[str]:
    """Files at a final name (not a dot-named temp file) that do not read whole: a partial output published."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file

    bad = []
    for p in base.rglob("*"):
        # dot-named files and directories are temporaries (i2l.io.atomic_tmp / atomic_files), not final names
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(base).parts) or "ray_results" in p.parts:
            continue
        try:
            if p.suffix == ".parquet":
                pq.read_metadata(p)
            elif p.suffix == ".safetensors":
                load_file(p)
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".jsonl":
                [json.loads(line) for line in p.read_text().splitlines()]
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            bad.append(f"{p.relative_to(base)}: {e}")
    return bad


def done_stages(root: Path) -> set[str]:
    from i2l.store import Store

    if not (root / "results.duckdb").is_file():
        return set()
    return {s for (s,) in Store(root / "results.duckdb", read_only=True).rows("SELECT stage FROM stages")}


def kill_at(stage: str, root: Path, env: dict, log: Path) -> dict:
    """Run until `stage` starts, SIGTERM the run's process group; what was seen (asserted by the tests)."""
    marker = (root / STARTED[stage]).resolve()
    proc = start(root, env, log)
    try:
        while not marker.exists():
            assert proc.poll() is None, f"ran to the end before {stage}: {log.read_text()[-3000:]}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        t = time.monotonic()
        try:
            rc = proc.wait(EXIT_S)
        except subprocess.TimeoutExpired:
            rc = None
        seen = {"rc": rc, "exit_s": time.monotonic() - t}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 15  # Ray's daemons and workers may take a moment after the driver
    while (left := tagged(env["I2L_FAULT_TAG"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    for p in left:
        p.kill()
    seen.update(left=[" ".join(p.cmdline())[:80] for p in left if p.is_running()], done=done_stages(root),
                broken=broken_files(root.parent), log=log.read_text()[-2000:])
    return seen


@pytest.fixture(scope="module")
def chain(prefect_server, tmp_path_factory):
    """The uninterrupted reference run (in the background) and the chain of killed runs, then the final re-run."""
    base = tmp_path_factory.mktemp("sigterm")
    env = {**prefect_server.env(base / "prefect-home"), "PYTHONPATH": str(REPO), "I2L_RETRY_DELAY_S": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    ref_root = base / "ref" / "data"
    ref = start(ref_root, {**env, "I2L_FAULT_TAG": uuid.uuid4().hex}, base / "ref.log")
    root, kills = base / "killed" / "data", {}
    t0 = time.monotonic()
    try:
        for k, stage in enumerate(STARTED):
            kills[stage] = kill_at(stage, root, {**env, "I2L_FAULT_TAG": uuid.uuid4().hex}, base / f"{k}-{stage}.log")
        final = subprocess.run(command(root), cwd=REPO, env={**env, "I2L_FAULT_TAG": uuid.uuid4().hex},
                               capture_output=True, text=True, timeout=900, check=False)
        ref_rc = ref.wait(900)
    finally:
        if ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)
    summary = {s: {k: v for k, v in seen.items() if k != "log"} | {"done": sorted(seen["done"])}
               for s, seen in kills.items()}
    (base / "summary.json").write_text(json.dumps(summary, indent=1))  # for whoever reads the run
    return {"kills": kills, "final": final, "root": root, "ref_root": ref_root, "ref_rc": ref_rc,
            "ref_log": (base / "ref.log").read_text()[-3000:], "seconds": time.monotonic() - t0}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STARTED))
def test_sigterm_stops_the_stage_cleanly(chain, stage):
    seen = chain["kills"][stage]
    earlier = set(ORDER[:ORDER.index(stage)])
    assert seen["rc"] is not None, f"still running {EXIT_S} s after SIGTERM: {seen['log']}"
    assert seen["rc"] != 0, seen["log"]
    assert seen["left"] == [], "processes outlived the killed run"
    assert seen["broken"] == [], "half-written files at final names"
    assert stage not in seen["done"] and earlier <= seen["done"], (seen["done"], "killed mid-stage?")
    assert not set(BESIDE.get(stage, ())) & seen["done"], (seen["done"], "marked done, though killed mid-work")


def digests(root: Path, *subdirs: str) -> dict[str, str]:
    from i2l.io import file_sha256

    return {str(p.relative_to(root)): file_sha256(p) for d in subdirs for p in sorted((root / d).rglob("*"))
            if p.is_file() and p.suffix in (".parquet", ".safetensors", ".jsonl", ".csv")}


def weights(path: Path) -> str:
    """Digest of a safetensors file's tensors, not its metadata."""
    import hashlib

    from safetensors.numpy import load_file

    tensors = load_file(path)
    return hashlib.sha256(b"".join(k.encode() + tensors[k].tobytes() for k in sorted(tensors))).hexdigest()


def outputs(root: Path) -> dict:
    """What a finished pipeline leaves that must not depend on kills: data, models, checkpoint, LoRAs, store rows."""
    from i2l.io import file_sha256
    from i2l.produce.catalog import read_catalog
    from i2l.store import Store

    store = Store(root / "results.duckdb", read_only=True)
    (loras,) = list((root / "runs/debug/loras").iterdir())
    catalog = read_catalog(loras)
    for r in catalog:  # each catalogued file whole and as recorded
        assert r["sha256"] == file_sha256(loras / r["path"]), r["path"]
    q = store.rows
    return {
        "files": digests(root, "toyworld", "prepared/debug/train", "prepared/debug/val", "toy",
                         "runs/debug/train/checkpoints"),
        # LoRA files name the train run (keyed by the data's mtimes, so per data root) in their metadata:
        # compare their weights
        "lora_weights": {str(p.relative_to(loras)): weights(p) for p in sorted(loras.rglob("*.safetensors"))},
        "catalog": sorted((r["lora_id"], r["style_id"], r["path"], r["rank"], r["n_refs"]) for r in catalog),
        "loras": q("SELECT lora_id, style_id, rank, n_refs FROM loras WHERE lora_id LIKE 'i2l:%' "
                   "OR lora_id LIKE 'gray_lora@%' ORDER BY 1"),
        "eval_loras": q("SELECT count(*) FROM loras"),
        "datasets": q("SELECT count(*) FROM datasets"),
        "checkpoints": q("SELECT step, sha256 FROM checkpoints ORDER BY 1"),
        "curve": q("SELECT count(*), count(DISTINCT step) FROM train_curves"),
        "samples": q("SELECT method, count(*) FROM samples GROUP BY 1 ORDER BY 1"),
        "scores": q("SELECT metric, status, count(*) FROM scores GROUP BY 1, 2 ORDER BY 1, 2"),
        "stages": sorted(s for (s,) in q("SELECT stage FROM stages")),
    }


@pytest.mark.slow
def test_rerun_after_the_kills_equals_an_uninterrupted_run(chain):
    final, root = chain["final"], chain["root"]
    assert chain["ref_rc"] == 0, chain["ref_log"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    got, want = outputs(root), outputs(chain["ref_root"])
    assert set(ORDER) <= set(got["stages"])
    for name in want:
        assert got[name] == want[name], name
    leftovers = [str(p.relative_to(root)) for p in root.rglob(".*.tmp")]
    assert leftovers == [], "temporary files of the killed runs were never cleaned up"
