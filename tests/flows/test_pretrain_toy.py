"""flows.pretrain_toy trains the toy scorer beside the toy encoder: the scorer's work starts as the encoder's does
(each on one thread), its result is taken at its own turn, it starts only when that turn would run it, and a run
that stops before then stops it too. The model trainers are stood in for; the stages' bookkeeping is real."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from i2l.layout import SCORER_FILE

MARKERS = {"backbone": "pretrain.json", "encoder": "encoder.json", "scorer": SCORER_FILE}


class ThreadCall:
    """The interface of i2l.cluster.child.ChildCall, with the work on a thread of this process."""

    def __init__(self, work):
        self.running, self.terminated, self._out = threading.Event(), False, {}
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work):
        self.running.set()
        self._out["value"] = work()

    def result(self):
        self._thread.join()
        return self._out["value"]

    def terminate(self):
        self.terminated = True


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A prepared dir (its manifest is all the flow reads) and fake trainers that log what they did and when."""
    import flows.stages
    from flows import pretrain_toy

    monkeypatch.setattr(flows.stages, "get_run_logger", lambda: logging.getLogger("i2l.tests"))
    prepared = tmp_path / "prepared" / "debug"
    prepared.mkdir(parents=True)
    (prepared / "manifest.json").write_text(json.dumps({"fingerprint": "data"}))
    w = {"root": tmp_path, "events": [], "calls": [], "encoder_fails": False}

    def trainer(name):
        def train(cfg, data_dir, out_dir, progress, started=None):
            if started is not None:  # the scorer's turn, its work started beside the encoder
                out = started.result()
                w["events"].append(f"{name} taken")
                return out
            if name == "encoder" and w["calls"]:
                # the scorer's work must be under way while the encoder's runs (it never starts after it)
                w["events"].append("scorer running" if w["calls"][-1].running.wait(30) else "scorer not running")
            if name == "encoder" and w["encoder_fails"]:
                raise RuntimeError("encoder failed")
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / MARKERS[name]).write_text("{}")
            w["events"].append(f"{name} trained")
            return {}
        return train

    def start_scorer(cfg, data_dir, out_dir):
        w["events"].append("scorer started")
        w["calls"].append(ThreadCall(lambda: trainer("scorer")(cfg, data_dir, out_dir, False)))
        return w["calls"][-1]

    for name in ("backbone", "encoder", "scorer"):
        monkeypatch.setattr(pretrain_toy, f"{name}_task", trainer(name))
    monkeypatch.setattr(pretrain_toy, "start_scorer", start_scorer)

    def run(force=None):
        w["events"].clear()
        w["calls"].clear()
        return {r["stage"]: r for r in pretrain_toy.pretrain_toy.fn("debug", [], str(tmp_path), progress=False,
                                                                     force=force)}
    w["run"] = run
    return w


def test_the_scorer_trains_beside_the_encoder(world):
    stages = world["run"]()
    events = world["events"]
    assert events[:2] == ["backbone trained", "scorer started"] and events[-1] == "scorer taken"
    assert sorted(events[2:-1]) == ["encoder trained", "scorer running", "scorer trained"]
    assert events.index("scorer running") < events.index("encoder trained")
    assert not any(s["skipped"] for s in stages.values())
    assert stages["pretrain_scorer"]["info"]["trained_beside"] == "pretrain_encoder"
    assert (world["root"] / "toy" / "debug" / "scorer" / SCORER_FILE).is_file()
    # done: nothing starts again
    stages = world["run"]()
    assert all(s["skipped"] for s in stages.values()) and world["events"] == []


def test_the_scorer_starts_beside_the_encoder_only_when_its_turn_would_run_it(world):
    world["run"]()
    world["run"](force=["pretrain_encoder"])
    assert world["events"] == ["encoder trained"]  # the scorer is done: not started
    world["run"](force=["pretrain_scorer"])
    assert world["events"] == ["scorer started", "scorer trained", "scorer taken"]  # the encoder skipped


def test_a_run_that_fails_before_the_scorers_turn_stops_it(world):
    from i2l.store import Store

    world["encoder_fails"] = True
    with pytest.raises(RuntimeError, match="encoder failed"):
        world["run"]()
    (call,) = world["calls"]
    assert call.terminated
    done = {s for (s,) in Store(world["root"] / "results.duckdb", read_only=True).rows("SELECT stage FROM stages")}
    assert done == {"pretrain_backbone"}
