"""The mean-LoRA and adapter baselines trained side by side (eval.baseline_workers = 2): the first in this process,
the other on a Ray worker, each recorded as its own store run with its curve and done-mark, the same weights as
training them one after another in this process, and reused by a later evaluation."""

import pytest
import torch
from safetensors.torch import load_file

from i2l.config import get_config
from i2l.eval.baseline_runs import Baselines, BaselineTrainer
from i2l.infer.api import I2L
from i2l.model.lora import LoRA
from i2l.store import Store
from i2l.train.checkpoint import require_checkpoint


def _baselines(debug_run, scorer_dir, root, workers):
    cfg = get_config("debug")
    cfg.data_root = str(debug_run.data_root)
    cfg.scorer.clip_checkpoint = str(scorer_dir)  # the evaluation's config asks for one; baselines never read it
    ck = require_checkpoint(debug_run.run_dir)
    from i2l.eval.identity import dataset_fingerprint, eval_config

    ecfg = eval_config(cfg, ck)
    ecfg.eval.baseline_workers = workers
    model = I2L.load(ck, device="cpu", data_root=ecfg.data_root)
    store = Store(root / "results.duckdb")
    return Baselines(model, ecfg, debug_run.prepared_dir, root / "baselines", store, "parent",
                     dataset_fingerprint(debug_run.prepared_dir), progress=False), store


def _weights(b, kind):
    out = b.out(kind)
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.slow
def test_baselines_side_by_side_equal_one_after_another(debug_run, scorer_dir, tmp_path, ray_session, monkeypatch):
    here = []  # what trained in this process (a Ray worker imports the module afresh: its calls are not seen)
    original = BaselineTrainer.train_here
    monkeypatch.setattr(BaselineTrainer, "train_here",
                        staticmethod(lambda kind, *a: here.append(kind) or original(kind, *a)))
    threads = torch.get_num_threads()
    side, side_store = _baselines(debug_run, scorer_dir, tmp_path / "side", workers=2)
    assert side.prepare(("base", "mean_lora", "adapter")) == ["mean_lora", "adapter"]
    assert here == ["mean_lora"]  # one worker process, not two: each would add its torch to the machine's peak
    assert torch.get_num_threads() == threads  # the one thread it trained on is not left set here
    for kind in ("mean_lora", "adapter"):
        assert side.ready(kind)
        runs = side_store.query("SELECT run_id, status FROM runs WHERE kind = ?", [f"train_{kind}"])
        assert list(runs.status) == ["ok"]
        curve = side_store.rows("SELECT count(*) FROM train_curves WHERE run_id = ?", [runs.run_id[0]])[0][0]
        assert curve == side.ecfg.train.steps  # one record per step (the debug budget)
    # trained elsewhere: a second prepare finds both ready and trains nothing
    assert side.prepare(("mean_lora", "adapter")) == []

    serial, _ = _baselines(debug_run, scorer_dir, tmp_path / "serial", workers=1)
    assert serial.prepare(("mean_lora", "adapter")) == []  # one worker: nothing side by side
    for kind in ("mean_lora", "adapter"):
        serial.get(kind)
        a, b = _weights(side, kind), _weights(serial, kind)
        assert a.keys() == b.keys() and a
        for k in a:  # one thread in the workers, maybe more here: equal up to float reduction order
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_failed_worker_keeps_the_baseline_trained_here(debug_run, scorer_dir, tmp_path, ray_session):
    side, store = _baselines(debug_run, scorer_dir, tmp_path, workers=2)
    side.out("adapter").parent.mkdir(parents=True)
    side.out("adapter").write_text("not a folder")  # the worker's adapter cannot be saved there
    threads = torch.get_num_threads()
    with pytest.raises(Exception, match=side.out("adapter").name):
        side.prepare(("mean_lora", "adapter"))
    status = dict(store.rows("SELECT kind, status FROM runs"))
    assert status == {"train_mean_lora": "ok", "train_adapter": "failed"}
    assert side.ready("mean_lora") and not side.ready("adapter")  # finished work is kept, the failure is not hidden
    assert torch.get_num_threads() == threads


def test_one_worker_trains_in_this_process(debug_run, scorer_dir, tmp_path):
    serial, store = _baselines(debug_run, scorer_dir, tmp_path, workers=1)
    lora, info = serial.get("mean_lora")
    assert info["steps"] == serial.ecfg.train.steps and serial.ready("mean_lora")
    assert store.rows("SELECT count(*) FROM runs WHERE kind = 'train_mean_lora' AND status = 'ok'")[0][0] == 1
    assert isinstance(lora, LoRA) and lora.names
