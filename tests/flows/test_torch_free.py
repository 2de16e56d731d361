"""The flow process stays free of torch until a stage runs models in it (flows/__init__): it waits next to the
Ray Train worker while the predictor trains, and whatever it imported counts in the machine's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "diffusers", "transformers", "open_clip", "safetensors.torch"]


def _run(script: str, env: dict | None = None, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_flows_and_the_cli_imports_no_model_library():
    script = ("import json, sys, flows, i2l.cli\n"
              "for name in flows.FLOWS: flows.load_flow(name)\n"
              "i2l.cli.build_parser()  # imports every subcommand's module\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert _run(script) == []


@pytest.mark.slow
def test_the_flow_process_trains_without_importing_torch(prefect_server, tmp_path):
    """prepare_data, pretrain_toy (its three models in child processes) and train (a Ray Train worker) from a
    fresh data root: every stage ran, and the process that ran the flows never imported torch."""
    overrides = ["train.steps=2", "train.ckpt_every=1", "train.backbone_steps=2", "encoder.pretrain_steps=2",
                 "scorer.pretrain_steps=2"]
    script = f"""
import json, sys
from flows.prepare_data import prepare_data
from flows.pretrain_toy import pretrain_toy
from flows.train import train
kw = dict(preset="debug", overrides={overrides!r}, data_root={str(tmp_path)!r}, progress=False)
stages = [r for flow in (prepare_data, pretrain_toy, train) for r in flow(**kw)]
print(json.dumps({{"ran": {{r["stage"]: not r["skipped"] for r in stages}},
                  "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""
    out = _run(script, env={"PREFECT_API_URL": prefect_server.api_url}, timeout=600)
    assert out["heavy"] == [], f"the flow process imported {out['heavy']}"
    assert {s for s, ran in out["ran"].items() if ran} >= {"pretrain_backbone", "pretrain_encoder",
                                                            "pretrain_scorer", "train"}
    toy = tmp_path / "toy" / "debug"
    assert (toy / "backbone" / "pretrain.json").is_file() and (toy / "scorer" / "scorer.json").is_file()
    assert list((tmp_path / "runs" / "debug" / "train" / "checkpoints").glob("step_*/predictor.safetensors"))
