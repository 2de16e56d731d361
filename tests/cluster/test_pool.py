"""The one actor pool on a real local Ray cluster: an actor that crashes mid-call is restarted by Ray and the call
re-sent; an actor killed for good is replaced and its calls requeued; every result arrives exactly once; a call
that keeps killing its actor is reported; the call's own errors propagate; GPU actors ask for GPUs. Pools side by
side run at once, and an error or a Ctrl-C stops them all with their actors killed."""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import cloudpickle

from i2l.cluster.pool import ActorPool, Call, PoolOptions, map_side_by_side

# Ray's workers cannot import a test module: ship its classes by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Squarer:
    """A plain class the pool turns into actors."""

    def __init__(self, marker_dir: str):
        self.dir = Path(marker_dir)

    def square(self, x: int) -> tuple[int, int]:
        return x, x * x

    def square_or_crash(self, x: int, crash_on: int) -> tuple[int, int]:
        marker = self.dir / f"crashed-{x}"
        if x == crash_on and not marker.exists():  # the process dies mid-call, once
            marker.touch()
            os._exit(1)
        return x, x * x

    def crash(self) -> None:
        os._exit(1)

    def refuse(self, x: int) -> None:
        raise ValueError(f"bad input {x}")


class Sleeper:
    """Records its pid at start; `nap` sleeps, `meet` waits for the other pool's actor."""

    def __init__(self, pid_dir: str):
        Path(pid_dir, str(os.getpid())).touch()

    def nap(self, seconds: float) -> None:
        time.sleep(seconds)

    def meet(self, me: str, other: str, timeout: float) -> bool:
        """Leave file `me`, then wait for file `other`: whether the other pool's actor ran meanwhile."""
        Path(me).touch()
        deadline = time.monotonic() + timeout
        while not Path(other).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return Path(other).exists()


class Broken:
    def __init__(self):
        raise OSError("cannot read the weights")


def options(**kw) -> PoolOptions:
    return PoolOptions(**{"workers": 2, "progress": False, "name": "test", **kw})


def test_crashed_actor_is_restarted_and_its_call_retried_once(ray_session, tmp_path):
    calls = [Call("square_or_crash", (x, 3)) for x in range(8)]
    with ActorPool(Squarer, (str(tmp_path),), options()) as pool:
        got = [done.value for done in pool.map(calls)]
    assert (tmp_path / "crashed-3").exists(), "the actor did crash"
    assert sorted(got) == [(x, x * x) for x in range(8)]  # every result, exactly once
    assert pool.retried == 0  # Ray's restart + re-send handled it


@pytest.mark.parametrize("ray_restarts", [0, 1])
def test_actor_dead_for_good_is_replaced_and_every_result_arrives_once(ray_session, tmp_path, ray_restarts):
    ray = ray_session
    killed = []
    got = Counter()
    with ActorPool(Squarer, (str(tmp_path),), options(max_restarts=ray_restarts)) as pool:
        for done in pool.map(Call("square", (x,)) for x in range(10)):
            got[done.value] += 1
            if not killed:  # its queued call and the next one submitted to it must run elsewhere
                ray.kill(done.actor)
                killed.append(done.actor)
    assert got == Counter((x, x * x) for x in range(10))
    assert pool.retried >= 1 and pool.workers == 2


def test_a_call_that_keeps_killing_its_actor_is_reported(ray_session, tmp_path):
    pool = ActorPool(Squarer, (str(tmp_path),), options(workers=1, max_retries=1, max_restarts=0))
    with pool, pytest.raises(RuntimeError, match="call crash #0 failed 2 times because its actor died"):
        list(pool.map([Call("crash")]))
    assert pool.retried == 1


def test_errors_of_the_call_itself_propagate(ray_session, tmp_path):
    with ActorPool(Squarer, (str(tmp_path),), options()) as pool, pytest.raises(ValueError, match="bad input 2"):
        list(pool.map([Call("refuse", (2,))]))
    assert pool.retried == 0


def test_actors_that_cannot_start_fail_the_run(ray_session):
    with ActorPool(Broken, (), options(start_hint="is the checkpoint on every node?")) as pool, \
            pytest.raises(RuntimeError, match=r"(?s)test actors failed to start \(is the checkpoint.*cannot read the weights"):
        list(pool.map([Call("anything")]))


def test_actors_fit_the_cluster_and_gpu_actors_ask_for_gpus(ray_session, tmp_path):
    with ActorPool(Squarer, (str(tmp_path),), options(workers=5)) as pool:  # the session cluster has 2 CPUs
        got = sorted(d.value for d in pool.map(Call("square", (x,), size=2) for x in range(4)))
    assert got == [(x, x * x) for x in range(4)]
    assert pool.workers == 2
    with ActorPool(Squarer, (), options(workers=1)) as pool:
        assert list(pool.map([])) == [] and pool.workers == 0
    with pytest.raises(ValueError, match="need 1.0 GPU.*has 0.*or produce.num_gpus=0"):
        list(ActorPool(Squarer, (), options(num_gpus=1.0, cpu_hint="produce.num_gpus=0")).map([Call("square")]))
    four_gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 4.0})
    opts, slots = ActorPool(Squarer, (), options(num_gpus=0.5))._actor_options(four_gpus)
    assert (opts["num_gpus"], opts["num_cpus"], slots) == (0.5, 1, 8)
    assert opts["max_restarts"] == 1 and opts["max_task_retries"] == 1


def _sleepers(tmp_path, name: str) -> ActorPool:
    """A pool of one Sleeper, which leaves its pid in tmp_path/name."""
    (tmp_path / name).mkdir()
    return ActorPool(Sleeper, (str(tmp_path / name),), options(workers=1, name=name))


def _gone(pid_dir: Path, within_s: float = 15.0) -> bool:
    """Whether every actor that left its pid in pid_dir has exited (waiting up to within_s)."""
    import psutil

    deadline = time.monotonic() + within_s
    while any(psutil.pid_exists(int(p.name)) for p in pid_dir.iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("at_once", [1, 2])
def test_pools_side_by_side_run_at_once_only_when_asked(ray_session, tmp_path, at_once):
    a, b = (tmp_path / "a.here", tmp_path / "b.here")
    wait = 60.0 if at_once == 2 else 3.0  # side by side they meet as soon as both actors are up
    work = [(_sleepers(tmp_path, "a"), [Call("meet", (str(a), str(b), wait))]),
            (_sleepers(tmp_path, "b"), [Call("meet", (str(b), str(a), wait))])]
    met = [d.value for done in map_side_by_side(work, at_once) for d in done]
    assert len(met) == 2 and all(met) == (at_once == 2)


def test_as_many_calls_as_actors_run_at_once_one_per_actor(ray_session, tmp_path):
    # two calls that each wait for the other: they meet only if the two actors run them at the same time (with
    # queue_depth 2 they once both went to the first actor, in turn, and the second actor sat idle)
    a, b = (tmp_path / "a.here", tmp_path / "b.here")
    (tmp_path / "pids").mkdir()
    with ActorPool(Sleeper, (str(tmp_path / "pids"),), options(workers=2, queue_depth=2)) as pool:
        met = [d.value for d in pool.map([Call("meet", (str(a), str(b), 20.0)), Call("meet", (str(b), str(a), 20.0))])]
    assert met == [True, True]
    assert pool.workers == 2


def test_an_error_in_one_pool_stops_the_others_and_kills_their_actors(ray_session, tmp_path):
    (tmp_path / "bad").mkdir()
    bad = ActorPool(Squarer, (str(tmp_path / "bad"),), options(workers=1, name="bad"))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bad input 7"):
        map_side_by_side([(_sleepers(tmp_path, "slow"), [Call("nap", (5.0,))] * 6), (bad, [Call("refuse", (7,))])], 2)
    assert time.monotonic() - t0 < 20, "the slow pool ran on after the error"  # its calls alone take 30 s
    assert _gone(tmp_path / "slow"), "the stopped pool's actor outlived it"


def test_ctrl_c_while_pools_run_stops_them_and_kills_their_actors(ray_session, tmp_path):
    work = [(_sleepers(tmp_path, name), [Call("nap", (5.0,))] * 6) for name in ("x", "y")]
    timer = threading.Timer(3.0, _thread.interrupt_main)  # KeyboardInterrupt in this (the main) thread
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            map_side_by_side(work, 2)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 20  # not the 30 s of calls
    assert _gone(tmp_path / "x") and _gone(tmp_path / "y")
