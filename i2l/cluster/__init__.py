"""One way to get a Ray cluster: join RAY_ADDRESS when set, else start a local one without a dashboard. The one
actor pool every stage uses is `i2l.cluster.pool.ActorPool`."""

from __future__ import annotations

import os
import sys
import threading

from i2l.cluster.signals import sigterm_kept

_INIT_LOCK = threading.Lock()

# How long libgomp's threads (torch's CPU ops) spin waiting for work before they sleep. Its default spins through
# a whole descheduling whenever another process holds a core: on 2 cores with one held by a busy loop, the toy i2L
# training step on two threads took 1696 ms at the default and 664 ms at 10 000 (on one thread: 470 ms); idle,
# 264 against 262 ms (docs/results.md, "How do the stages fare on a busy machine?"). It sets no thread count and
# changes no result.
OPENMP_SPINCOUNT = "10000"


def spin_briefly() -> None:
    """GOMP_SPINCOUNT for the processes started from here on (and for this one, if torch is not loaded yet).
    A user's own setting wins."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)


def ensure_ray(num_cpus: int | None = None):
    """Connect to Ray once per process and return the `ray` module.

    RAY_ADDRESS set => join that cluster (num_cpus is the cluster's business then); else start a local
    cluster with `num_cpus` CPUs (None: all of this machine's). The local cluster's daemons get a parent-death
    signal tied to the thread that starts them (PR_SET_PDEATHSIG), so a cluster started in a pool thread (a
    submitted Prefect task's) would die when that thread exits: off the main thread it is started from a parked
    thread that lives as long as the process.
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
            with sigterm_kept():
                ray.init(address=address, log_to_driver=False)
        else:
            # A local cluster is never drained by an autoscaler: Ray Train's preemption watcher (an actor process of
            # ~120 MB through every training) has nothing to watch here. A user's own setting wins.
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Ray Train's controller looks at its workers every 2 s by default, and a finished run takes several
            # looks to wind down: fit() returned 5.2 s after the last step, 1.0 s at 0.25 s (docs/results.md).
            # A look is one small call per worker; a local cluster has few. A user's own setting wins.
            os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
            # One glibc malloc arena per CPU for the cluster's processes (they inherit it through the raylet), not
            # glibc's 8 per core: a Ray worker runs many threads (gRPC, Ray Train's), each of which would get its
            # own arena. On 2 cores the training worker's peak RSS fell 83 MB at the same speed
            # (docs/results.md). A user's own setting wins.
            os.environ.setdefault("MALLOC_ARENA_MAX", str(max(2, num_cpus or os.cpu_count() or 2)))
            spin_briefly()  # the training, production and evaluation workers share the machine's cores
            # address="local": never silently join a cluster a `ray start` left behind on this machine.
            # log_to_driver=False: workers' stdout would interleave with our progress bars.
            kwargs = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False, "log_to_driver": False}
            if threading.current_thread() is threading.main_thread():
                # ours stays: a SIGTERM then ends the run as it would have before Ray (i2l.cluster.signals)
                with sigterm_kept():
                    ray.init(**kwargs)
            else:
                _init_from_keeper_thread(ray, kwargs)
    return ray


def _init_from_keeper_thread(ray, kwargs: dict) -> None:
    """ray.init(**kwargs) from a daemon thread that then parks until the process ends: the daemons it starts
    outlive the calling thread (they still die with the process, as from the main thread)."""
    started, failed = threading.Event(), []

    def keeper():
        try:
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - whatever ray.init raises is re-raised in the calling thread
            failed.append(e)
        finally:
            started.set()
        threading.Event().wait()  # parked: the daemons' parent-death signal is tied to this thread

    threading.Thread(target=keeper, name="ray-local-cluster", daemon=True).start()
    started.wait()
    if failed:
        raise failed[0]


def stop_ray(wait_s: float = 3.0) -> None:
    """Disconnect from Ray (a local cluster: stop it) within about `wait_s`, for a run that was told to stop.

    A process that dies by a signal skips `ray.shutdown()` at exit, and a local cluster's agents (dashboard, runtime
    env) and a running task's worker then outlive it (30-70 s here: the agents log that their raylet is gone, then
    linger). After a SIGTERM that reached the whole process group (`kill -- -PGID`, a container's stop),
    `ray.shutdown()` waits ~10 s on daemons that are already stopping, which the signal ends anyway: bounded, from
    a daemon thread."""
    ray = sys.modules.get("ray")  # never imported here: the signal may have landed inside `import ray`
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return
    done = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    done.start()
    done.join(wait_s)
