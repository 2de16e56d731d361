"""SIGTERM while a stage waits on Ray, in a flow run whose Ray an earlier stage started: what `i2l run` does when
it is stopped mid-training (prepare starts Ray for Ray Data, then training waits in Ray Train's `fit()`).

There, Prefect's SIGTERM handler is the one in place, and its exception cannot end a Ray wait: the run went on
until the wait ended by itself (60 s, when the driver gave up on its stopped cluster). The stage's wait here is a
Ray task of two minutes, so only a stage that ends at the signal passes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from servers import tagged

REPO = Path(__file__).resolve().parents[2]
EXIT_S = 20  # the wait it must not sit out is 120 s

SCRIPT = textwrap.dedent("""
    import sys, time
    from prefect import flow
    from flows.stages import StageContext
    from i2l.cluster import ensure_ray

    data_root, marker = sys.argv[1], sys.argv[2]

    @flow
    def start_ray():  # as the prepare_data flow does, in the main thread
        ensure_ray(1)

    @flow
    def wait_on_ray():
        ctx = StageContext.open("debug", [], data_root)

        def work(run_id):
            ray = ensure_ray()

            @ray.remote
            def slow(marker):
                open(marker, "w").close()
                time.sleep(120)

            ray.get(slow.remote(marker))
            return {}

        ctx.run_stage("train", "k1", lambda: False, work)

    @flow
    def pipeline():
        start_ray()
        wait_on_ray()

    pipeline()
    print("NOT STOPPED")
""")


def test_sigterm_ends_a_stage_waiting_on_ray_started_by_an_earlier_stage(prefect_server, tmp_path):
    from i2l.store import Store

    tag, marker, root = uuid.uuid4().hex, tmp_path / "task-started", tmp_path / "data"
    env = {**prefect_server.env(tmp_path / "prefect-home"), "I2L_FAULT_TAG": tag}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(marker)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=30)[0][-3000:]
            time.sleep(0.05)
        time.sleep(1)  # the driver is in the Ray wait
        proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a pod's stop
        t = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=EXIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {EXIT_S} s after SIGTERM") from None
        exit_s = time.monotonic() - t
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGTERM, out[-3000:]  # Prefect ends a terminated flow run by the signal
    assert "NOT STOPPED" not in out
    assert "Crash detected! Execution was aborted by a termination signal" in out, out[-3000:]
    assert exit_s < EXIT_S
    store = Store(root / "results.duckdb", read_only=True)
    assert store.stage_info("train", "k1") is None  # not marked done
    assert store.rows("SELECT status FROM runs WHERE kind = 'train'") == [("failed",)]
    # the stage stopped the local cluster: nothing of the run outlives it (without, its daemons lingered for
    # 30-70 s after a driver that died by the signal)
    deadline = time.monotonic() + 2
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline())[:80] for p in left]
