"""Predictor training: loss falls, exact resume after a stop, refusal of foreign checkpoints, Ray Train DDP."""

import json
import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from i2l.backbones import load_backbone
from i2l.config import get_config
from i2l.data.tuples import TupleStream, collate, collate_groups
from i2l.infer.api import I2L
from i2l.model.encoder import load_encoder
from i2l.model.flow_matching import fm_loss
from i2l.model.predictor import I2LPredictor, predict_lora
from i2l.train.checkpoint import latest_checkpoint
from i2l.train.loop import train_predictor


def _cfg(debug_run, **over):
    cfg = get_config("debug", {"train.ckpt_every": 3, **over})
    cfg.data_root = str(debug_run.data_root)
    cfg.backbone.path, cfg.encoder.path = debug_run.cfg.backbone.path, debug_run.cfg.encoder.path
    return cfg


@torch.no_grad()
def _fixed_loss(cfg, run_dir, batch):
    """FM loss of a checkpoint on one fixed batch with a fixed noise/timestep grid."""
    bb, enc = load_backbone(cfg), load_encoder(cfg.encoder)
    pred = I2LPredictor(cfg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    ck = latest_checkpoint(run_dir)
    if ck is not None:
        pred.load_state_dict(load_file(str(ck / "predictor.safetensors")))
    targets, prompts, refs, n = batch
    g = torch.Generator().manual_seed(0)
    t = torch.rand(len(prompts), generator=g)
    noise = torch.randn(targets.shape, generator=g)
    lora = predict_lora(pred, enc, refs, n)
    return float(fm_loss(bb, targets, bb.encode_prompts(prompts), lora, t=t, noise=noise))


def test_loss_falls_over_20_steps(debug_run, tmp_path):
    cfg = _cfg(debug_run, **{"train.steps": 20, "train.lr": 1e-2})
    batch = collate(list(__import__("itertools").islice(iter(TupleStream(debug_run.prepared_dir, seed=7)), 16)),
                    32, cfg.encoder.image_size)
    before = _fixed_loss(cfg, tmp_path / "none", batch)
    info = train_predictor(cfg, debug_run.prepared_dir, tmp_path / "run", progress=False)
    after = _fixed_loss(cfg, tmp_path / "run", batch)
    assert info["steps"] == 20
    assert after < before * 0.98, (before, after)


def test_stop_then_resume_reaches_the_same_weights(debug_run, tmp_path):
    cfg = _cfg(debug_run, **{"train.steps": 6})
    train_predictor(cfg, debug_run.prepared_dir, tmp_path / "straight", progress=False)
    info = train_predictor(cfg, debug_run.prepared_dir, tmp_path / "stopped", progress=False, stop_after=4)
    assert info["steps"] == 4
    assert latest_checkpoint(tmp_path / "stopped").name == "step_0000003"  # step 4 was lost with the "kill"
    info = train_predictor(cfg, debug_run.prepared_dir, tmp_path / "stopped", resume=True, progress=False)
    assert info["steps"] == 6
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "predictor.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "stopped") / "predictor.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    curve = json.loads((latest_checkpoint(tmp_path / "stopped") / "curve.json").read_text())
    assert [r["step"] for r in curve] == [1, 2, 3, 4, 5, 6]
    # the lr schedule came back at step 3 from the step alone, and so did every loss
    assert curve == json.loads((latest_checkpoint(tmp_path / "straight") / "curve.json").read_text())


def test_a_fresh_run_into_another_runs_directory_is_refused(debug_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(debug_run.run_dir, run)
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        train_predictor(_cfg(debug_run), debug_run.prepared_dir, run, progress=False)


def test_checkpoint_for_another_backbone_or_targets_is_refused(debug_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(debug_run.checkpoint_dir, ck)
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "backbone_id": "zimage:elsewhere"}))
    with pytest.raises(ValueError, match="trained for backbone 'zimage:elsewhere'"):
        I2L.load(ck, data_root=str(debug_run.data_root))
    state["config"]["backbone"]["targets"] = ["attn.to_q", "attn.to_k"]
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="different set of layers"):
        I2L.load(ck, data_root=str(debug_run.data_root))


def test_tuples_vary_n_keep_single_refs_and_never_reuse_the_target(debug_run):
    stream = iter(TupleStream(debug_run.prepared_dir, max_refs=3, seed=1))
    tuples = [next(stream) for _ in range(120)]
    ns = {len(t.refs) for t in tuples}
    assert 1 in ns and max(ns) == 3
    assert all(t.target not in t.refs for t in tuples)
    targets, _, refs, n = collate(tuples[:8], 32, 32)
    assert refs.shape[:2] == (8, int(n.max())) and targets.shape == (8, 3, 32, 32)


def test_grouped_tuples_share_one_reference_set_of_other_contents(debug_run):
    stream = iter(TupleStream(debug_run.prepared_dir, max_refs=3, seed=2, targets_per_lora=4))
    tuples = [next(stream) for _ in range(64)]
    groups: dict[int, list] = {}
    for t in tuples:
        groups.setdefault(t.group, []).append(t)
    assert len(groups) >= 64 // 4 and max(len(g) for g in groups.values()) == 4
    for g in groups.values():
        assert len({t.style_id for t in g}) == 1 and all(t.refs is g[0].refs for t in g)
        assert len({t.target for t in g}) == len(g)  # G different targets
        assert not {t.target for t in g} & set(g[0].refs)  # none of them is a reference
    # single-reference sets are still drawn with groups
    assert 1 in {len(g[0].refs) for g in groups.values()}
    targets, prompts, refs, n, owner = collate_groups(tuples[:8], 32, 32)
    assert targets.shape[0] == len(prompts) == 8 and refs.shape[0] == n.shape[0] == int(owner.max()) + 1
    for i, t in enumerate(tuples[:8]):  # each target points at its own reference set
        first = next(j for j, u in enumerate(tuples[:8]) if u.group == t.group)
        assert owner[i] == owner[first] and len(t.refs) == int(n[owner[i]])


def test_a_predicted_lora_serves_its_whole_group(debug_run):
    """take(owner) gives each target exactly the LoRA of its reference set, and gradients flow back through it."""
    cfg = _cfg(debug_run)
    bb, enc = load_backbone(cfg), load_encoder(cfg.encoder)
    pred = I2LPredictor(cfg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    torch.nn.init.normal_(pred.head_B.D[0], std=0.1)  # a non-zero LoRA
    refs = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    owner = torch.tensor([0, 0, 1, 1, 1])
    lora = predict_lora(pred, enc, refs).take(owner)
    name = pred.names[0]
    assert lora.batch_size == 5 and torch.equal(lora.B[name][1], lora.B[name][0])
    assert torch.allclose(lora.B[name][4], predict_lora(pred, enc, refs[1:2]).B[name][0], atol=1e-6)
    lora.B[name].sum().backward()
    assert pred.head_B.D[0].grad is not None and pred.head_B.D[0].grad.abs().sum() > 0



def test_resume_with_other_run_settings_is_refused(debug_run, tmp_path):
    """Resuming continues the saved optimisation: other lr/seed or another predictor shape is refused by name
    (not resumed as if it were this run, nor a raw load_state_dict error); more steps extend the run."""
    run = tmp_path / "run"
    shutil.copytree(debug_run.run_dir, run)
    for over, named in (({"train.lr": 0.5, "train.seed": 123}, r"train\.lr: .*train\.seed|train\.seed: .*train\.lr"),
                        ({"predictor.hidden": 64}, r"predictor\.hidden: 32 -> 64")):
        with pytest.raises(ValueError, match=named) as err:
            train_predictor(_cfg(debug_run, **over), debug_run.prepared_dir, run, resume=True, progress=False)
        assert "resume with the original settings, or start a new run with another --out" in str(err.value).lower()
    assert latest_checkpoint(run).name == "step_0000002"  # nothing was written
    info = train_predictor(_cfg(debug_run, **{"train.steps": 3}), debug_run.prepared_dir, run, resume=True,
                           progress=False)
    assert info["steps"] == 3 and latest_checkpoint(run).name == "step_0000003"


def test_ray_train_launch_refuses_other_run_settings_before_ray_starts(debug_run, tmp_path):
    """`i2l train --resume` goes through Ray Train, whose workers would retry the refusal max_failures times:
    the launcher refuses before any Ray work, so the message reaches the user at once."""
    from i2l.train.launcher import launch_training

    run = tmp_path / "run"
    shutil.copytree(debug_run.run_dir, run)
    with pytest.raises(ValueError, match=r"train\.lr: "):
        launch_training(_cfg(debug_run, **{"train.lr": 0.5}), debug_run.prepared_dir, run, resume=True,
                        progress=False)
    assert not (run / "ray_results").exists() and latest_checkpoint(run).name == "step_0000002"


@pytest.mark.timeout(60)  # the bug this guards against was an endless loop
@pytest.mark.parametrize("case", ["one_row_styles", "more_workers_than_styles"])
def test_a_rank_without_a_usable_style_fails_instead_of_hanging(tmp_path, case):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from i2l.data.megastyle import PREPARED_SCHEMA
    from i2l.data.tuples import _owner

    styles, per_style = (3, 1) if case == "one_row_styles" else (2, 2)
    rows = [{"id": f"s{i:03d}_c{j}", "style_id": f"s{i:03d}", "content": f"content {j}", "style": "a style",
             "image": b"x", "width": 1, "height": 1, "sha256": "", "split": "train", "source_file": "a"}
            for i in range(styles) for j in range(per_style)]
    (tmp_path / "train").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA), tmp_path / "train" / "part-00000.parquet")
    world = 1 if case == "one_row_styles" else 8
    rank = next(r for r in range(world) if case == "one_row_styles" or
                r not in {_owner(f"s{i:03d}", world) for i in range(styles)})
    with pytest.raises(ValueError, match=f"rank {rank} of world size {world}.*train.num_workers"):
        next(iter(TupleStream(tmp_path, "train", rank=rank, world=world)))


def _our_ray_processes(title: str) -> list:
    """This test process's descendants (its local Ray cluster's workers) whose process title starts with `title`."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(title):
                found.append(p.pid)
        except psutil.Error:  # exited while we looked
            pass
    return found


def _gone_within(look, seconds: float) -> list:
    """look() until it finds nothing or `seconds` pass (actors exit asynchronously); what it found last."""
    deadline = time.monotonic() + seconds
    while (found := look()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


@pytest.mark.slow
def test_ray_train_with_two_cpu_workers(debug_run, tmp_path, ray_session):
    from i2l.train.launcher import launch_training

    cfg = _cfg(debug_run, **{"train.steps": 3, "train.num_workers": 2, "train.batch_size": 4})
    sigint = signal.getsignal(signal.SIGINT)
    info = launch_training(cfg, debug_run.prepared_dir, tmp_path / "ddp", progress=False)
    # nothing of the run outlives it: Ray Train's SIGINT handler (it held the controller) is gone, and so is the
    # controller's process, which the later stages' memory would otherwise carry
    assert signal.getsignal(signal.SIGINT) is sigint
    assert _gone_within(lambda: _our_ray_processes("ray::TrainController"), seconds=30) == []
    ck = latest_checkpoint(tmp_path / "ddp")
    assert ck is not None and ck.name == "step_0000003"
    curve = json.loads((ck / "curve.json").read_text())
    assert len(curve) == 3
    # what `i2l train` prints and keeps in train.json (Ray Train dropped the final report: it was {} before)
    assert info["steps"] == 3 and info["checkpoint"] == str(ck)
    assert info["last_loss"] == pytest.approx(sum(r["loss"] for r in curve) / 3)


@pytest.mark.slow
def test_ray_train_restarts_a_dead_worker_and_resumes_from_the_checkpoint(debug_run, tmp_path, ray_session):
    """A worker process killed at step 4 (after the step-3 checkpoint): FailureConfig restarts the group, which
    resumes at step 3 — the run finishes with one curve entry per step, none lost or repeated."""
    from i2l.train.launcher import launch_training

    cfg = _cfg(debug_run, **{"train.steps": 6, "train.batch_size": 4, "train.max_failures": 1})
    launch_training(cfg, debug_run.prepared_dir, tmp_path / "crash", progress=False, crash_at=4)
    ck = latest_checkpoint(tmp_path / "crash")
    assert ck is not None and ck.name == "step_0000006"
    assert [r["step"] for r in json.loads((ck / "curve.json").read_text())] == [1, 2, 3, 4, 5, 6]

    cfg.train.max_failures = 0  # without restarts the same death fails the launch loudly
    with pytest.raises(Exception):  # noqa: B017  (Ray wraps the worker's death in its own error types)
        launch_training(cfg, debug_run.prepared_dir, tmp_path / "fatal", progress=False, crash_at=4)
    assert latest_checkpoint(tmp_path / "fatal").name == "step_0000003"  # finished work kept


def _maps_torch(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch_cpu" in f.read()
    except OSError:  # exited while we looked
        return False


@pytest.mark.slow
def test_one_worker_training_keeps_torch_out_of_the_train_controller_and_shows_its_progress(
        debug_run, tmp_path, ray_session, capfd):
    """The Train controller actor lives as long as the training, next to its worker. TorchTrainer's backend made it
    import torch (~0.3 GB more of make run's peak memory) although one worker has no process group to set up.
    The worker's output stays in Ray's logs, so the launching process draws the bar from the worker's progress
    file (make run's training stage was silent for minutes) and times the launch from it."""
    import threading

    from i2l.train.launcher import launch_training

    cfg = _cfg(debug_run, **{"train.steps": 8, "train.batch_size": 4})
    done, errors, infos = threading.Event(), [], []

    def run():
        try:
            infos.append(launch_training(cfg, debug_run.prepared_dir, tmp_path / "one", progress=True))
        except BaseException as e:  # noqa: BLE001  (re-raised below, on the test's thread)
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run)
    t.start()
    controllers, with_torch = set(), set()
    while not done.wait(0.2):
        for pid in _our_ray_processes("ray::TrainController"):
            controllers.add(pid)
            if _maps_torch(pid):
                with_torch.add(pid)
    t.join()
    assert not errors, errors
    assert latest_checkpoint(tmp_path / "one").name == "step_0000008"
    assert controllers, "never saw the Train controller's process"
    assert not with_torch, "the Train controller of a one-worker run imported torch"
    err = capfd.readouterr().err
    assert "train i2L" in err and "8/8" in err, err[-2000:]
    info = infos[0]
    assert 0 < info["launch_worker_started_s"] <= info["launch_first_step_s"] <= info["launch_last_step_s"] \
        <= info["seconds"]
