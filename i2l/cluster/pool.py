"""The one Ray actor pool: a plain Python class becomes CPU or GPU actors, tasks are calls of its methods, and
results come back as they finish (for the caller to write durably). An actor's death never loses a task."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Self

from i2l.cluster import ensure_ray

WAIT_SLICE_S = 0.25  # how long a pool waits on Ray between looks at its stop flag
STOP_GRACE_S = 10.0  # how long a stopped group waits for its pools to kill their actors


@dataclass
class PoolOptions:
    """How many actors, on what, and how hard to try. Failure policy, in two layers:

    1. Ray's: an actor whose process dies (crash, OOM kill) is restarted in place up to `max_restarts` times, and
       the calls it had pending are re-sent up to `max_task_retries` times.
    2. The pool's, for what Ray gives up on (restarts spent, `ray.kill`, node lost): the actor is replaced by a
       fresh one and the call goes back to the front of the queue; a call whose actor died more than `max_retries`
       times stops the run with a RuntimeError naming it. An exception raised by the call itself propagates at once.
    Once the queue is empty, an actor with nothing left in flight is killed: it frees its slot for the restart (or
    the replacement) of an actor whose node was lost, which would otherwise wait for that slot forever.
    """

    workers: int = 2  # actors wanted; capped by the calls to make and by the cluster's free slots
    num_gpus: float = 0.0  # GPUs per actor; 0 = CPU actors (1 CPU each)
    max_retries: int = 3  # times a call is requeued after its actor died for good
    max_restarts: int = 1  # Ray restarts of a crashed actor (its __init__ runs again)
    max_task_retries: int = 1  # Ray re-sends of a call whose actor crashed and was restarted
    queue_depth: int = 2  # calls queued per actor: 2 keeps an actor busy while the driver handles a result
    name: str = "pool"  # progress bar and error messages
    unit: str = "task"  # what a call's `size` counts, on the progress bar
    progress: bool = True
    cpu_hint: str = ""  # the setting that runs the actors without GPUs, named when the cluster has too few
    start_hint: str = ""  # what every node must be able to read, named when the actors fail to start

    def __post_init__(self):
        if self.workers < 1 or self.queue_depth < 1:
            raise ValueError("pool workers and queue_depth must be >= 1")
        if min(self.num_gpus, self.max_retries, self.max_restarts, self.max_task_retries) < 0:
            raise ValueError("pool num_gpus, max_retries, max_restarts and max_task_retries must be >= 0")


@dataclass(frozen=True)
class Call:
    """One task: a method of the actor class with its arguments; `size` is what it adds to the progress bar."""

    method: str
    args: tuple = ()
    size: int = 1


@dataclass
class Finished:
    call: Call
    value: Any  # what the method returned
    actor: Any  # the actor handle that ran it


class PoolStopped(RuntimeError):
    """Raised by `map` in a pool that `stop()` was called on."""


def cluster_slots(ray, num_gpus: float) -> int:
    """How many actors of `num_gpus` GPUs each (0: one CPU each) the cluster holds at once."""
    res = ray.cluster_resources()
    return int(res.get("CPU", 1)) if num_gpus <= 0 else int(res.get("GPU", 0) // num_gpus)


class ActorPool:
    """`with ActorPool(Cls, init_args, options) as pool: for done in pool.map(calls): ...`

    Actors start in `map` (as many as the calls and the cluster allow) and are killed when the block ends, also
    on an error. Calls run in the given order (a requeued call first); results arrive in finishing order, and the
    next call is submitted only after the caller's loop body ran, so a body that kills an actor loses nothing.
    After `map`: `workers` (actors started), `retried` (calls requeued), `seconds` (first call to last result).
    """

    def __init__(self, actor_cls: type, init_args: tuple = (), options: PoolOptions | None = None):
        self.actor_cls, self.init_args, self.options = actor_cls, tuple(init_args), options or PoolOptions()
        self.workers, self.retried, self.seconds = 0, 0, 0.0
        self._actors: list = []
        self._new_actor = None  # starts one more actor, once map() knows the options
        self._bar = None
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make `map` (running in another thread) raise PoolStopped within WAIT_SLICE_S; its `with` block then
        kills the actors."""
        self._stop.set()

    def _wait(self, ray, refs: list, num_returns: int) -> list:
        """ray.wait for num_returns of refs, in slices, so that stop() is seen."""
        while True:
            if self._stop.is_set():
                raise PoolStopped(f"{self.options.name}: stopped")
            ready, _ = ray.wait(refs, num_returns=num_returns, timeout=WAIT_SLICE_S)
            if len(ready) >= num_returns:
                return ready

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._actors:
            ray = ensure_ray()
            for a in self._actors:
                if a is not None:  # None: retired when it ran out of calls
                    ray.kill(a)
        self._actors = []

    def _actor_options(self, ray) -> tuple[dict, int]:
        """Ray options of one actor and how many such actors fit in the cluster at once."""
        o = self.options
        options = {"num_cpus": 1, "max_restarts": o.max_restarts, "max_task_retries": o.max_task_retries}
        slots = cluster_slots(ray, o.num_gpus)
        if o.num_gpus <= 0:
            return options, slots
        if slots < 1:
            raise ValueError(f"{o.name} actors need {o.num_gpus} GPU(s) each but the Ray cluster has "
                             f"{ray.cluster_resources().get('GPU', 0)}: set RAY_ADDRESS to a GPU cluster"
                             + (f", or {o.cpu_hint}" if o.cpu_hint else ""))
        return {**options, "num_gpus": o.num_gpus}, slots

    def _start(self, ray, calls: deque) -> None:
        from ray.exceptions import RayActorError
        from tqdm import tqdm

        o = self.options
        options, slots = self._actor_options(ray)
        self.workers = max(1, min(o.workers, len(calls), slots))  # more actors than slots would wait forever
        remote_cls = ray.remote(self.actor_cls).options(**options)
        self._new_actor = lambda: remote_cls.remote(*self.init_args)
        self._actors = [self._new_actor() for _ in range(self.workers)]
        self._bar = tqdm(total=sum(c.size for _, c in calls), desc=f"{o.name} ({self.workers} actors)",
                         unit=o.unit, disable=not o.progress)
        ready = [a.__ray_ready__.remote() for a in self._actors]
        try:  # start-up (imports, weights) is paid once per actor: keep it out of `seconds`
            ray.get(self._wait(ray, ready, len(ready)))
        except RayActorError as e:
            hint = f" ({o.start_hint})" if o.start_hint else ""
            raise RuntimeError(f"{o.name} actors failed to start{hint}: {str(e)[-800:]}") from e

    def map(self, calls: Iterable[Call]) -> Iterator[Finished]:
        """Run every call once on the actors and yield each result as it finishes (see the class doc)."""
        from ray.exceptions import RayActorError

        o = self.options
        queue = deque(enumerate(calls))  # (call number, call)
        if not queue:
            return
        ray = ensure_ray()
        if self._actors:
            raise RuntimeError("an ActorPool maps once: make a new one")
        self._start(ray, queue)
        t0 = perf_counter()
        generation = [0] * self.workers  # bumped when a slot's actor is replaced
        inflight: dict = {}  # object ref -> (slot, generation, actor, call number, call)
        busy = [0] * self.workers  # calls in flight per slot
        deaths: Counter = Counter()  # call number -> times its actor died for good under it

        def submit(slot: int) -> None:
            if queue:
                k, call = queue.popleft()
                actor = self._actors[slot]
                inflight[getattr(actor, call.method).remote(*call.args)] = (slot, generation[slot], actor, k, call)
                busy[slot] += 1

        def retire_if_idle(slot: int) -> None:
            # Nothing left to give it: free its CPU/GPU now. A call whose node died waits for Ray to restart its
            # actor (or for our replacement) in a free slot; with every slot held by an idle actor it never ran.
            if not queue and not busy[slot] and self._actors[slot] is not None:
                ray.kill(self._actors[slot])
                self._actors[slot] = None

        # one call per actor before any actor gets a second: filled actor by actor, two calls on two actors
        # (queue_depth 2) both went to the first, which ran them in turn while the other sat idle
        for _ in range(o.queue_depth):
            for slot in range(self.workers):
                submit(slot)
        while inflight:
            ref = self._wait(ray, list(inflight), 1)[0]
            slot, gen, actor, k, call = inflight.pop(ref)
            busy[slot] -= 1
            try:
                value = ray.get(ref)
            except RayActorError as e:  # Ray's restarts and re-sends are spent: our layer
                deaths[k] += 1
                if deaths[k] > o.max_retries:
                    raise RuntimeError(f"{o.name}: call {call.method} #{k} failed {deaths[k]} times because its "
                                       f"actor died; last: {str(e)[-800:]}") from e
                self.retried += 1
                queue.appendleft((k, call))
                if gen == generation[slot]:  # the first failure seen from this actor: replace it, once
                    ray.kill(actor)
                    self._actors[slot], generation[slot] = self._new_actor(), gen + 1
                submit(slot)
                continue
            self._bar.update(call.size)
            yield Finished(call, value, actor)
            submit(slot)  # after the caller's body: a call given to an actor it killed is retried for sure
            retire_if_idle(slot)
        self.seconds = perf_counter() - t0


def map_side_by_side(work: list[tuple[ActorPool, list[Call]]], at_once: int) -> list[list[Finished]]:
    """Map each (pool, calls) to the end, up to `at_once` pools at a time, each from a thread of its own, and
    return every pool's results (each in finishing order). Pools of different actor classes can then share a
    cluster (one scorer model per actor, each pool on its own GPUs) instead of taking turns; the caller keeps
    `at_once` x workers within the cluster's slots, since a pool waits until all its actors have started.
    The first error stops every pool (each kills its actors) and is raised here, as is a signal's exception in
    the calling thread (Ctrl-C, SIGTERM): the threads are daemons that never hold the process open."""
    results: list[list[Finished]] = [[] for _ in work]
    errors: list[BaseException] = []
    todo, lock = deque(range(len(work))), threading.Lock()

    def stop_all() -> None:
        for pool, _ in work:
            pool.stop()

    def run() -> None:
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.popleft()
            pool, calls = work[i]
            try:
                with pool:
                    for done in pool.map(calls):
                        results[i].append(done)
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                with lock:
                    errors.append(e)
                stop_all()
                return

    threads = [threading.Thread(target=run, name=f"pool-{k}", daemon=True) for k in range(min(at_once, len(work)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(WAIT_SLICE_S)  # in slices: a signal's exception must reach this thread
    except BaseException:
        stop_all()
        for t in threads:
            t.join(STOP_GRACE_S)
        raise
    if errors:
        raise errors[0]
    return results
