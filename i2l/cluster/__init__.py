"""One way to get a Ray cluster: join RAY_ADDRESS when set, else start a local one without a dashboard. The one
actor pool every stage uses is `i2l.cluster.pool.ActorPool`; `on_worker` runs one call in a worker process."""

from __future__ import annotations

import os
import threading

_INIT_LOCK = threading.Lock()


def ensure_ray(num_cpus: int | None = None):
    """Connect to Ray once per process and return the `ray` module.

    RAY_ADDRESS set => join that cluster (num_cpus is the cluster's business then); else start a local
    cluster with `num_cpus` CPUs (None: all of this machine's).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    # Prefect runs submitted tasks in threads: two that both find Ray down would both call ray.init, and the
    # second fails ("Perhaps you called ray.init twice by accident?")
    with _INIT_LOCK:
        if ray.is_initialized():
            return ray
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # A local cluster is never drained by an autoscaler: Ray Train's preemption watcher (an actor process of
            # ~120 MB through every training) has nothing to watch here. A user's own setting wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # address="local": never silently join a cluster a `ray start` left behind on this machine.
            # log_to_driver=False: workers' stdout would interleave with our progress bars.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def _call_with_threads(fn, threads: int, args: tuple, kwargs: dict):
    import torch

    torch.set_num_threads(max(1, threads))
    return fn(*args, **kwargs)


def on_worker(fn, *args, cpus: int = 1, **kwargs):
    """fn(*args, **kwargs) in a Ray worker process holding `cpus` CPUs, with as many torch threads; blocks until it
    returns and hands back its result (its exception, re-raised here). Two threads of a caller that each call this
    run two trainings side by side without sharing one process's torch thread pool."""
    ray = ensure_ray()
    # max_calls=1: the worker process exits with the call, so its heap and models leave the machine with it
    remote = ray.remote(num_cpus=cpus, max_retries=0, max_calls=1)(_call_with_threads)
    return ray.get(remote.remote(fn, cpus, args, kwargs))
