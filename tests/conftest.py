"""Shared session fixtures: the offline environment, one local Ray cluster (`ray_session`), one real Prefect server
(`prefect_server`), the toy preset's toy world (`toy_preset_world`, read only) and `debug_run`, a debug world built
once (toy world -> prepared shards -> toy backbone + encoder -> an untrained 2-step predictor checkpoint)."""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A suite started in the background by a script (`make test &`, nohup) inherits SIGINT ignored, and so would every
# process the tests start: the Ctrl-C tests would then test nothing (the signal never arrives) and fail. The tests
# play an interactive user, whose Ctrl-C is delivered; a child that inherits SIG_IGN keeps it across exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from conftest_ray import ray_session  # noqa: F401  (one Ray cluster for the whole session)
from servers import prefect_env, start_prefect_server

# Tiny budgets: the fixture must take seconds, and no test may depend on training quality.
DEBUG_OVERRIDES = {"train.steps": 2, "train.ckpt_every": 2, "train.backbone_steps": 2, "encoder.pretrain_steps": 2}


@pytest.fixture(scope="session", autouse=True)
def _flow_runs_without_heartbeats():
    """Flow runs in the test process send no heartbeats. Prefect's flow engine joins its heartbeat thread at the end
    of every flow run, and that thread sleeps in 1-s steps: each (sub)flow run took ~1 s longer, a pipeline of
    six flows ~6 s. Heartbeats only feed a server's zombie-run detection, which no test uses. Flows started as users
    start them (`i2l run` and deployment subprocesses) keep Prefect's default. (The environment cannot say "off":
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY takes only an integer >= 30.)"""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@dataclass
class DebugRun:
    """Where the session's debug world lives. `cfg` is the debug preset with the overrides used to build it."""

    data_root: Path  # toyworld/, prepared/, toy/debug/{backbone,encoder}/, runs/train/
    toyworld_dir: Path
    prepared_dir: Path  # train/ + val/ shards, val_manifest.jsonl
    run_dir: Path  # training run: checkpoints/step_0000002/
    cfg: object

    @property
    def checkpoint_dir(self) -> Path:
        from i2l.train.checkpoint import latest_checkpoint

        return latest_checkpoint(self.run_dir)


def build_debug_run(root: Path) -> DebugRun:
    """Build the debug world under root with the library calls the CLI makes (Ray is used by prepare)."""
    import torch
    from golden_losses import THREADS

    from i2l.config import get_config
    from i2l.data.prepare import prepare
    from i2l.layout import resolve_paths
    from i2l.toy.backbone_pretrain import pretrain_backbone
    from i2l.toy.encoder_pretrain import pretrain_encoder
    from i2l.toy.world import write_toyworld
    from i2l.train.loop import train_predictor

    cfg = get_config("debug", DEBUG_OVERRIDES)
    cfg.data_root = str(root)
    cfg = resolve_paths(cfg)
    toy, prepared, run = root / "toyworld", root / "prepared", root / "runs" / "train"
    write_toyworld(cfg.toyworld, toy, progress=False)
    prepare(cfg, toy, prepared, progress=False)
    # the golden losses build on this world's models: the same reductions whatever an earlier test left set
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        pretrain_backbone(cfg, prepared, cfg.backbone.path, progress=False)
        pretrain_encoder(cfg, prepared, cfg.encoder.path, progress=False)
        train_predictor(cfg, prepared, run, progress=False)
    finally:
        torch.set_num_threads(before)
    return DebugRun(root, toy, prepared, run, cfg)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory, ray_session) -> DebugRun:  # noqa: F811
    """A debug world + 2-step checkpoint, built once per test session (~30 s on 2 cores)."""
    return build_debug_run(tmp_path_factory.mktemp("debug_run"))


@dataclass
class PrefectServer:
    """The session's `prefect server start`. Tests share its database, so each keeps to its own flow runs,
    deployments and data roots; `env(home)` is a CLI subprocess's environment with a Prefect home of its own."""

    api_url: str

    def env(self, home: Path) -> dict:
        return prefect_env(home, self.api_url)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> PrefectServer:
    """One real Prefect API for the session (its start-up takes 10-40 s on a busy 2-core machine)."""
    with start_prefect_server(tmp_path_factory.mktemp("prefect-home")) as url:
        yield PrefectServer(url)


@pytest.fixture(scope="session")
def toy_preset_world(tmp_path_factory) -> Path:
    """A 400-style world of the toy preset's generator (the preset writes 2000), written once; tests read it and
    write elsewhere. 400: the drawing test's 400-step backbone reaches its bar on it (0.54 on 2000 styles)."""
    from i2l.config import get_config
    from i2l.toy.world import write_toyworld

    out = tmp_path_factory.mktemp("toy_preset") / "toyworld"
    write_toyworld(dataclasses.replace(get_config("toy").toyworld, styles=400), out, progress=False)
    return out
