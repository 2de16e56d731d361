"""The trained baselines an evaluation compares with (mean-LoRA, adapter): reused when the results store says
their budget was trained and the files are there, else trained now, each as its own store run with its loss
curve, marked done as soon as it is saved. With eval.baseline_workers > 1 the missing ones train side by side on
one CPU each: their small steps gain little from a second thread, so two finish in about the time of one. The
first trains in this process, which would otherwise only wait, the others in Ray worker processes
(i2l/cluster/pool.py runs them; a dead worker is retried): a worker of its own for each would add ~1.2 GB
(its torch and diffusers) to the machine's peak, which on 2 CPUs took `make run` past 4 GiB."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from i2l.config import Config, config_from_dict
from i2l.eval.identity import baseline_budget
from i2l.io import json_digest
from i2l.store import Store

KINDS = ("mean_lora", "adapter")


def _train_fn(kind: str):
    from i2l.baselines.adapter import train_adapter
    from i2l.baselines.mean_lora import train_mean_lora

    return train_mean_lora if kind == "mean_lora" else train_adapter


class BaselineTrainer:
    """Ray actor: trains one baseline per call on the CPU with `threads` torch threads."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))

    def train(self, kind: str, cfg: dict, prepared_dir: str, out: str) -> tuple[str, dict]:
        return kind, self.train_here(kind, config_from_dict(cfg), prepared_dir, out)

    @staticmethod
    def train_here(kind: str, cfg: Config, prepared_dir, out) -> dict:
        return _train_fn(kind)(cfg, prepared_dir, out, progress=False, device="cpu")


class Baselines:
    """The baselines of one evaluation: where each one's files go (by its budget's digest) and its store marks."""

    def __init__(self, model, ecfg: Config, prepared_dir, base_dir: Path, store: Store, parent_id: str,
                 dataset_id: str, progress: bool):
        self.model, self.ecfg, self.prepared_dir, self.base_dir = model, ecfg, prepared_dir, base_dir
        self.store, self.parent_id, self.progress = store, parent_id, progress
        # once: a budget reads the checkpoint's state file
        self.keys = {k: json_digest(baseline_budget(ecfg, model.checkpoint, dataset_id, k)) for k in KINDS}

    def key(self, kind: str) -> str:
        return self.keys[kind]

    def out(self, kind: str) -> Path:
        return self.base_dir / f"{kind}-{self.key(kind)}"

    def load(self, kind: str):
        from i2l.baselines.adapter import load_adapter
        from i2l.baselines.mean_lora import load_mean_lora

        if kind == "mean_lora":
            return load_mean_lora(self.out(kind), self.model.backbone)
        return load_adapter(self.out(kind), self.model.backbone, self.model.encoder,
                            device=str(self.model.encoder.device))

    def ready(self, kind: str) -> bool:
        """Marked done in the store under this budget and its files still load."""
        if not self.store.is_stage_done(f"train_{kind}", self.key(kind)):
            return False
        try:
            self.load(kind)
            return True
        except FileNotFoundError:
            return False  # recorded but deleted since: train again

    def get(self, kind: str):
        """(trained baseline, its info): trained now, in this process, if it is not ready."""
        if self.store.is_stage_done(f"train_{kind}", self.key(kind)):
            try:
                return self.load(kind)  # loaded once, not checked by `ready` and then loaded again
            except FileNotFoundError:
                pass  # recorded but deleted since: train again
        with self.store.run(f"train_{kind}", self.ecfg.name, self.ecfg.to_dict(), parent_id=self.parent_id) as run_id:
            info = _train_fn(kind)(self.ecfg, self.prepared_dir, self.out(kind), progress=self.progress,
                                   device=str(self.model.encoder.device))
            self._record(kind, run_id, info)
        return self.load(kind)

    def prepare(self, kinds) -> list[str]:
        """Train the missing ones of `kinds` side by side on one CPU each when eval.baseline_workers > 1 and the
        evaluation runs on the CPU (on a GPU they train one after another in this process, in `get`): the first
        here, in a thread, the others on Ray CPU workers. Each is recorded as it finishes. -> the kinds trained."""
        missing = [k for k in kinds if k in KINDS and not self.ready(k)]
        workers = self.ecfg.eval.baseline_workers
        if workers < 2 or len(missing) < 2 or str(self.model.encoder.device) != "cpu":
            return []
        from i2l.cluster.pool import ActorPool, Call, PoolOptions
        from i2l.train.threads import torch_threads

        runs = {k: self.store.start_run(f"train_{k}", self.ecfg.name, self.ecfg.to_dict(), parent_id=self.parent_id)
                for k in missing}  # one store run per baseline, open while it trains
        here, elsewhere = missing[0], missing[1:]
        calls = [Call("train", (k, self.ecfg.to_dict(), str(self.prepared_dir), str(self.out(k))))
                 for k in elsewhere]
        options = PoolOptions(workers=workers - 1, name="train baselines", unit="baseline", progress=self.progress,
                              start_hint="every node must read the prepared data and the toy models' folders")
        local: dict = {}

        def train_here() -> None:
            try:
                local["info"] = BaselineTrainer.train_here(here, self.ecfg, self.prepared_dir, self.out(here))
            except BaseException as e:  # noqa: BLE001 - raised in the calling thread
                local["error"] = e

        # one thread, as in a worker: this thread only waits on Ray meanwhile (and gets the same weights)
        with torch_threads(1):
            thread = threading.Thread(target=train_here, name=f"train {here}", daemon=True)
            thread.start()
            try:
                with ActorPool(BaselineTrainer, (1,), options) as pool:
                    for fin in pool.map(calls):
                        self._ok(*fin.value, runs)  # kept at once, whatever happens to the other one
                while thread.is_alive():
                    thread.join(0.25)  # in slices: a signal's exception must reach this thread
            except Exception:
                thread.join()  # a worker failed: the one here finishes and is kept (no retry trains beside it)
                if "info" in local:
                    self._ok(here, local["info"], runs)
                self._fail(runs)
                raise
            except BaseException:  # a signal ends the process: the daemon thread with it
                self._fail(runs)
                raise
        if "error" in local:
            self._fail(runs)
            raise local["error"]
        self._ok(here, local["info"], runs)
        return missing

    def _ok(self, kind: str, info: dict, runs: dict) -> None:
        """A baseline that finished: recorded, and its store run closed."""
        self._record(kind, runs[kind], info)
        self.store.finish_run(runs.pop(kind), "ok")

    def _fail(self, runs: dict) -> None:
        for run_id in runs.values():  # the ones still training failed with the pool
            self.store.finish_run(run_id, "failed")
        runs.clear()

    def _record(self, kind: str, run_id: str, info: dict) -> None:
        out = self.out(kind)
        curve = json.loads((out / f"{kind}.json").read_text())["curve"]
        with self.store.transaction():
            self.store.record_curve(run_id, curve)
            self.store.mark_stage_done(f"train_{kind}", self.key(kind), {
                "dir": str(out), "run_id": run_id, **{k: v for k, v in info.items() if k != "dims"}})
