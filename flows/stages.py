"""What every flow shares: the config (a preset + a few overrides), stage keys, skip-if-done by what the
results store says, store runs for the work done, and which failures are worth a retry. Orchestration only."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal

from i2l.cluster import stop_ray
from i2l.cluster.memory import release_freed_memory
from i2l.cluster.signals import signals_end_the_run, terminable
from i2l.config import Config, get_config
from i2l.io import json_digest, remove_dead_tmp
from i2l.layout import Paths, paths_for, resolve_paths
from i2l.store import Store, StoreBusyError, fail_open_runs
from i2l.train.run_key import forget_run_key, json_field, read_run_key, write_run_key

STAGES = ("toyworld", "prepare", "pretrain_backbone", "pretrain_encoder", "pretrain_scorer", "train", "produce",
          "evaluate", "report")

# Failures worth another try: a store locked by a long reader, a Ray worker or node lost, a dropped connection.
# User errors (bad config, missing input) and bugs fail at once: retrying them only repeats the message.
_TRANSIENT_NAMES = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError", "RaySystemError", "GetTimeoutError",
    "OutOfMemoryError", "ObjectStoreFullError",
})
_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotImplementedError,
                AssertionError, PermissionError)


def is_transient(exc: BaseException | None) -> bool:
    """True when the exception (or one it was raised from) is a transient failure and none is a user error."""
    seen, transient = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _USER_ERRORS):
            return False  # Ray's RayTaskError(ValueError) is a ValueError too: a bug in the task, not the cluster
        names = {t.__name__ for t in type(exc).__mro__}
        transient |= isinstance(exc, (StoreBusyError, ConnectionError, TimeoutError)) or bool(names & _TRANSIENT_NAMES)
        exc = exc.__cause__ or exc.__context__
    return transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only transient failures (the failed state carries the exception)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_transient(exc)


# Options of every task that calls into i2l: retries on transient failures; no Prefect result caching, because
# the results store decides what is done (and the inputs hold configs that Prefect cannot hash).
TASK_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": float(os.environ.get("I2L_RETRY_DELAY_S", "10")),  # tests set 0
    "retry_condition_fn": retry_if_transient,
    "cache_policy": NONE,
}


def load_config(preset: str, overrides: Iterable[str] | None = None, data_root: str | None = None) -> Config:
    """The preset with its overrides, on `data_root` (else $I2L_DATA_ROOT, else the preset's, `data`)."""
    cfg = get_config(preset, list(overrides or []))
    # Absolute: paths recorded in the store stay valid whatever the reader's working directory.
    cfg.data_root = str(Path(data_root or os.environ.get("I2L_DATA_ROOT") or cfg.data_root).resolve())
    return cfg


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dataclasses become dicts)."""
    return json_digest([asdict(p) if is_dataclass(p) else p for p in parts])


def config_without_paths(cfg: Config) -> dict:
    """The config minus where things live: the same work on another data root has the same key."""
    d = cfg.to_dict()
    d.pop("data_root", None)
    return d


class StageTerminated(TerminationSignal, SystemExit):
    """Prefect's TerminationSignal (a crash or, when the runner asked, a cancellation of the flow run) that is also
    a SystemExit, so that it ends a Ray wait in the stage (i2l.cluster.signals.terminable)."""

    def __init__(self, sig: int):
        TerminationSignal.__init__(self, sig)
        SystemExit.__init__(self, 128 + sig)  # set explicitly: an uncaught SystemExit without a code exits 0


@contextmanager
def prefect_bridge_is(handler: Callable | None) -> Iterator[None]:
    """While the block runs, Prefect takes `handler` for its own SIGTERM handler.

    A worker cancels a flow run by asking it over Prefect's control channel, then sending SIGTERM. The flow run
    says yes only while the SIGTERM handler in place is Prefect's own (`_prefect_sigterm_handler`, by identity);
    with `terminable`'s in place it said nothing, so the worker killed the process as if it had crashed, and the
    cancelled run showed Crashed. `terminable`'s handler raises a TerminationSignal too (StageTerminated), which
    Prefect's engine then records as the cancellation asked for. A Prefect without that name is left alone."""
    from prefect.utilities import engine

    name = "_prefect_sigterm_handler"
    if handler is None or not callable(getattr(engine, name, None)):
        yield
        return
    lock = getattr(engine, "_prefect_sigterm_bridge_lock", None) or nullcontext()
    with lock:
        prefects = getattr(engine, name)
        setattr(engine, name, handler)
    try:
        yield
    finally:
        with lock:
            setattr(engine, name, prefects)


@dataclass
class StageResult:
    """What one stage did: skipped (done earlier, by the store) or ran, how long it took, and its info."""

    stage: str
    key: str
    skipped: bool
    seconds: float
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StageContext:
    """One flow's view of a data root: config, layout, results store, and the pipeline run it belongs to."""

    cfg: Config
    paths: Paths
    store: Store
    parent_run_id: str | None = None
    progress: bool = True
    force: frozenset[str] = frozenset()
    keyed: dict = field(default_factory=dict)  # the config as stage keys see it (no data root, no filled paths)

    @classmethod
    def open(cls, preset: str, overrides: Iterable[str] | None, data_root: str | None,
             parent_run_id: str | None = None, progress: bool = True, force: Iterable[str] | None = None,
             reports_root: str | None = None) -> StageContext:
        signals_end_the_run()  # flows run by a deployment's worker do not pass through the CLI's main
        cfg = load_config(preset, overrides, data_root)
        unknown = set(force or ()) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) in force: {sorted(unknown)}; stages are {', '.join(STAGES)}")
        paths = paths_for(cfg, reports_root)
        # The keys are taken before resolve_paths fills in the toy model locations (which follow data_root).
        keyed = config_without_paths(cfg)
        cfg = resolve_paths(cfg)
        return cls(cfg, paths, Store(paths.store_path), parent_run_id, progress, frozenset(force or ()), keyed)

    def section(self, *names: str) -> dict:
        """Config sections as they were before paths were filled in (for stage keys)."""
        return {n: self.keyed[n] for n in names}

    def done(self, stage: str, key: str) -> dict | None:
        """The info recorded when `stage` finished under `key`, or None if the store has no such mark."""
        return self.store.stage_info(stage, key)

    def finished(self, stage: str, key: str, outputs_exist: Callable[[], bool],
                 keyed_dir: str | os.PathLike | None = None, say=None) -> dict | None:
        """The info of (stage, key) when it is done and its outputs are there, so that `run_stage` skips it; else
        None (and `say`, a logger, hears why a stage the store marks done runs again)."""
        info = self.done(stage, key)
        if info is None or stage in self.force:
            return None
        ours = keyed_dir is None or read_run_key(keyed_dir) == key
        if ours and outputs_exist():
            return info
        if say is not None:
            why = "its outputs are gone" if ours else f"{keyed_dir} holds another key's outputs (or unfinished ones)"
            say.warning(f"{stage}: the store marks it done but {why}; running it again")
        return None

    def start_early(self, stage: str, key: str, outputs_exist: Callable[[], bool], keyed_dir: str | os.PathLike,
                    start: Callable[[], Any]) -> Any:
        """Start a stage's work ahead of its turn, beside another stage, when it will run: returns `start()`'s
        handle, or None when the stage is done. Its folder is cleared as `run_stage` clears it (first, so that a
        kill while it works leaves no key there); its turn then waits for the handle inside `run_stage`."""
        if self.finished(stage, key, outputs_exist, keyed_dir) is not None:
            return None
        _clear_for_work(keyed_dir)
        return start()

    def run_stage(self, stage: str, key: str, outputs_exist: Callable[[], bool], work: Callable[[str], dict],
                  record: Callable[[str, dict], None] | None = None, own_run: bool = True,
                  keyed_dir: str | os.PathLike | None = None) -> StageResult:
        """Skip when the store marks (stage, key) done and its outputs are on disk. Else run `work(run_id)` inside
        a store run (own_run; else the work records its own run), then `record(run_id, info)` and the done-mark
        in one store transaction.

        keyed_dir: the folder the stage writes whatever its key (one per preset), so another key's run may have
        written over it since. Its outputs count only while it records this key: the record is removed before the
        work starts and written once the work has finished, so a kill mid-write leaves no key. The temporaries a
        killed writer left there (`i2l.io.atomic_tmp` names whose process is gone) are removed as the work starts."""
        log = get_run_logger()
        info = self.finished(stage, key, outputs_exist, keyed_dir, say=log)
        if info is not None:
            log.info(f"{stage}: done earlier (key {key}), skipped")
            return StageResult(stage, key, True, 0.0, info)
        t0 = time.perf_counter()
        run_id = f"{stage}-{self.cfg.name}-{key}"
        if self.parent_run_id:
            # The pipeline's run is recorded once there is work to record under it (a re-run that skips every
            # stage leaves the store unchanged); starting a known run again just sets it running.
            self.store.start_run("pipeline", self.cfg.name, self.keyed, run_id=self.parent_run_id)
        # a SIGTERM ends the stage's Ray waits too (training, actors), and comes out as Prefect's TerminationSignal.
        # The stage's run (its own, or the one its work records) and the pipeline's are marked failed as the signal
        # arrives: a worker's cancel SIGTERMs the whole process group, Ray's daemons stop with it, and the driver
        # was seen to die before its unwinding reached the store (CI, 12-05).
        with terminable(raise_as=StageTerminated, on_signal=stop_ray, on_receipt=fail_open_runs) as handler, \
                prefect_bridge_is(handler), \
                self.store.run(stage, self.cfg.name, self.keyed, run_id=run_id, parent_id=self.parent_run_id) \
                if own_run else nullcontext():
            if keyed_dir is not None:
                _clear_for_work(keyed_dir)
            info = dict(work(run_id) or {})
            if keyed_dir is not None:
                # an actor that died mid-write in the stage (its work redone by another) left its temporary file
                remove_dead_tmp(Path(keyed_dir).rglob(".*.tmp"))
                write_run_key(keyed_dir, key)
            if own_run:
                info["run_id"] = run_id
            info["parent_run_id"] = self.parent_run_id
            with self.store.transaction():
                if record:
                    record(run_id, info)
                self.store.mark_stage_done(stage, key, info)
        seconds = time.perf_counter() - t0
        # the driver waits through the next stages (Ray workers train and sample): what this one freed goes back
        release_freed_memory()
        log.info(f"{stage}: finished in {seconds:.1f} s (key {key})")
        return StageResult(stage, key, False, seconds, info)


def _clear_for_work(keyed_dir: str | os.PathLike) -> None:
    """Before a stage's work writes into its folder: drop the key recorded there (until the work has finished) and
    the files a killed run half-wrote."""
    forget_run_key(keyed_dir)
    remove_dead_tmp(Path(keyed_dir).rglob(".*.tmp"))


def prepared_key(prepared_dir: Path) -> str | None:
    """The plan fingerprint (the prepare stage's key) in the manifest prepare writes last, or None."""
    return json_field(prepared_dir, "manifest.json", "fingerprint")


def data_id(ctx: StageContext) -> str:
    """Identity of the prepared data on disk (its plan fingerprint): what downstream stage keys build on."""
    fingerprint = prepared_key(ctx.paths.prepared_dir)
    if fingerprint is None:
        raise FileNotFoundError(f"no prepared data at {ctx.paths.prepared_dir}: run the prepare_data flow first "
                                f"(or `i2l run --flow prepare_data --preset {ctx.cfg.name}`)")
    return fingerprint


def jsonable(value: Any) -> Any:
    """Library summaries (dataclasses, paths) as plain JSON for the store and Prefect."""
    if is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value, default=str))


def path_exists(*paths: Path) -> Callable[[], bool]:
    return lambda: all(Path(p).exists() for p in paths)
