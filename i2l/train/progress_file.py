"""Training progress shown where the user launched it. Ray Train workers' output does not reach the driver (the
local cluster runs with log_to_driver=False, so workers cannot scribble over the driver's bars), so rank 0 writes
its progress to a small JSON file in the run directory (shared storage, as its checkpoints are) and the driver
mirrors it into its own progress bar. The same file times the launch: each record carries when the worker started
and finished its first step, and the time of its latest step."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Self

from i2l.io import write_json_atomic

PROGRESS_FILE = ".progress.json"


def write_progress(out_dir: str | Path, **fields) -> None:
    """Replace the run's progress record (whole, never half-written) with `fields` plus the time."""
    write_json_atomic(Path(out_dir) / PROGRESS_FILE, {**fields, "time": time.time()}, indent=None)


class ProgressWriter:
    """Rank 0's side: the record says when the worker started and finished its first step, and its latest step.
    Written at most every `every_s` (the driver polls at that pace; each write is a durable rename on shared
    storage, so not every step of a fast run) plus the first and the last step."""

    def __init__(self, out_dir: str | Path, total: int, every_s: float = 0.5):
        self.out_dir, self.total, self.every_s = out_dir, total, every_s
        self.started, self.first_step, self._written = time.time(), None, 0.0
        write_progress(out_dir, started=self.started)

    def step(self, step: int, loss: float) -> None:
        now, first = time.time(), self.first_step is None
        if first:
            self.first_step = now
        if first or step == self.total or now - self._written >= self.every_s:
            write_progress(self.out_dir, started=self.started, first_step=self.first_step, step=step, loss=loss)
            self._written = now


def read_progress(out_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(out_dir) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):  # not written yet, or replaced while read
        return None


class ProgressMirror:
    """Context manager: while training runs elsewhere, a daemon thread polls the progress file and draws a tqdm bar
    ("train i2L") in this process. `timings()` afterwards: seconds from launch to the worker's start, to the end
    of its first step and of its last step, as the worker recorded them."""

    def __init__(self, out_dir: str | Path, total: int, show: bool = True, every_s: float = 0.5):
        self.out_dir, self.total, self.show, self.every_s = Path(out_dir), total, show, every_s
        self._stop = threading.Event()
        self._last: dict | None = None
        self._thread = threading.Thread(target=self._poll, name="i2l-train-progress", daemon=True)

    def __enter__(self) -> Self:
        (self.out_dir / PROGRESS_FILE).unlink(missing_ok=True)  # an earlier launch's record is not this one's
        self._t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total, desc="train i2L", disable=not self.show)
        bar.set_postfix_str("starting Ray Train workers")
        try:
            while True:
                stop = self._stop.wait(self.every_s)  # read once more after the stop: the last step shows
                rec = read_progress(self.out_dir)
                if rec is not None:
                    self._last = rec
                    if "step" in rec:
                        bar.n = rec["step"]  # set, not added: a restarted worker group resumes at its checkpoint
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    else:
                        bar.set_postfix_str("loading models and data")
                if stop:
                    return
        finally:
            bar.close()

    def timings(self) -> dict[str, float]:
        rec = self._last or {}
        when = {"worker_started_s": rec.get("started"), "first_step_s": rec.get("first_step"),
                "last_step_s": rec.get("time") if "step" in rec else None}
        return {k: round(v - self._t0, 1) for k, v in when.items() if v is not None}
