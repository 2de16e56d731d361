"""ensure_ray from two threads at once (Prefect runs submitted tasks in threads): one local Ray, no error, and a
cluster that outlives the threads that started it (its daemons' parent-death signal is tied to the starting
thread)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import threading
from i2l.cluster import ensure_ray
errors, barrier = [], threading.Barrier(2)
def call():
    barrier.wait()  # both find Ray down at the same moment
    try:
        ensure_ray(num_cpus=1)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=call) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
import os, ray, time
print("errors", errors, "initialized", ray.is_initialized(), flush=True)
time.sleep(3)  # both starting threads are gone: a cluster tied to them would be dead by now
print("task after the threads", ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60), flush=True)
print("preemption watcher", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"))
print("worker arenas", ray.get(ray.remote(lambda: __import__("os").environ.get("MALLOC_ARENA_MAX")).remote()))
print("train looks every", ray.get(ray.remote(
    lambda: __import__("os").environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")).remote()))
print("worker spins", ray.get(ray.remote(lambda: __import__("os").environ.get("GOMP_SPINCOUNT")).remote()))
ray.shutdown()
"""


def test_two_threads_start_one_ray_without_error():
    env = {"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert "errors [] initialized True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    # a local cluster is never drained: Ray Train's preemption watcher (one more process) stays off
    assert "preemption watcher 0" in out.stdout
    # its processes get one malloc arena per CPU (num_cpus=1 here; at least 2), through the raylet's environment
    assert "worker arenas 2" in out.stdout, out.stdout[-2000:]
    # Ray Train's controller (an actor: the same environment) looks at its workers every 0.25 s, not every 2 s
    assert "train looks every 0.25" in out.stdout, out.stdout[-2000:]
    # its torch threads spin briefly before they sleep: a core held by another process does not stall them
    assert "worker spins 10000" in out.stdout, out.stdout[-2000:]
    assert "task after the threads 42" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
