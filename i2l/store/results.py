"""`Store`: the DuckDB results file. Short transactions through connections opened per use (so the file is
free between writes and readers in other processes can open it), retrying while another process holds it."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from i2l.store.owner import fail_orphaned_runs, owner_token
from i2l.store.rows import (
    COLUMNS,
    benchmark_rows,
    checkpoint_row,
    curve_rows,
    dedupe,
    eval_loss_row,
    method_row,
    now_utc,
    sample_row,
    score_row,
    stage_row,
    stored_lora_row,
    style_row,
    to_json,
)
from i2l.store.schema import MIGRATIONS

RUN_STATUSES = ("running", "ok", "failed", "cancelled")
_MIGRATE_LOCK = threading.Lock()  # threads of one process migrate one at a time
# SQL a person typed runs without access to anything but the store file (no COPY TO, read_csv, ATTACH,
# INSTALL/LOAD), and locked so that the SQL cannot SET the access back on.
USER_SQL_CONFIG = {"enable_external_access": False, "lock_configuration": True}


# Runs this process started and has not finished: run id -> store path (see `fail_open_runs`).
_OPEN_RUNS: dict[str, Path] = {}


def fail_open_runs() -> list[str]:
    """Mark failed every run this process started (start_run / run) and has not finished; returns their ids.

    For a termination signal's handler, before anything unwinds: a SIGTERM sent to a whole process group stops
    Ray's daemons at the same moment, and a driver was seen to die before its unwinding reached the store's own
    failure record, which then said 'running' for ever (CI, 2026-12-05). Each mark uses a store instance of its
    own, without migration and with a short lock wait; a run that cannot be marked is left to the unwinding."""
    failed = []
    for run_id, path in list(_OPEN_RUNS.items()):
        if not path.is_file():  # removed since (a temporary store): never create an empty one here
            _OPEN_RUNS.pop(run_id, None)
            continue
        try:
            Store(path, lock_timeout_s=2.0, auto_migrate=False).finish_run(run_id, "failed")
            failed.append(run_id)
        except ValueError:  # no longer in the file (another process rebuilt it): finish_run forgot it
            pass
        except Exception as e:  # noqa: BLE001 - busy or broken: the others are still marked
            print(f"could not mark run {run_id} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return failed


class StoreBusyError(RuntimeError):
    """The store file stayed locked by another process for longer than the store's lock timeout."""


def _is_busy(e: Exception) -> bool:
    msg = str(e)
    # Another process holds the file lock, or this process has it open with the other access mode.
    return "Could not set lock" in msg or "different configuration" in msg


class Store:
    """One DuckDB results file; see the package docstring for the access pattern and the schema."""

    def __init__(self, path: str | Path = "data/results.duckdb", read_only: bool = False,
                 lock_timeout_s: float = 60.0, auto_migrate: bool = True):
        self.path = Path(path)
        self.read_only = read_only
        self.lock_timeout_s = lock_timeout_s
        self._local = threading.local()
        if read_only:
            if not self.path.exists():
                raise FileNotFoundError(f"no results store at {self.path}; run a pipeline stage that writes "
                                        "results first (e.g. `i2l run`), or pass the right --db path")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if auto_migrate:
                self.migrate()
                self.fail_orphaned_runs()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, read_only={self.read_only})"

    # -- connections and transactions --------------------------------------------------------------

    def _connect(self, read_only: bool, user_sql: bool = False) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        while True:
            try:
                if user_sql:
                    # Never the shared read-write instance: its configuration is not locked. A writer of this
                    # process holding the file reads as busy, and the loop waits for it to close.
                    return duckdb.connect(str(self.path), read_only=True, config=USER_SQL_CONFIG)
                if not read_only:
                    return duckdb.connect(str(self.path))
                try:
                    return duckdb.connect(str(self.path), read_only=True)
                except duckdb.ConnectionException as e:
                    if "different configuration" not in str(e):
                        raise
                    # This process has the file open read-write (a writer thread): share that instance,
                    # whose MVCC snapshot shows committed data only; the caller opens a read-only transaction.
                    return duckdb.connect(str(self.path))
            except (duckdb.IOException, duckdb.ConnectionException) as e:
                if not _is_busy(e):
                    raise
                if time.monotonic() > deadline:
                    raise StoreBusyError(
                        f"results store {self.path} is locked by another process for more than "
                        f"{self.lock_timeout_s:.0f} s ({e}); close long-lived connections to it (e.g. an "
                        "open `duckdb` CLI session) or query through `i2l query`, which opens it briefly"
                    ) from e
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All writes inside appear together or not at all. Nested blocks (and the writer helpers called
        inside one) join the outermost transaction of this thread."""
        if self.read_only:
            raise ValueError(f"{self!r} is read-only; open Store(path) to write")
        outer = getattr(self._local, "con", None)
        if outer is not None:
            yield outer
            return
        con = self._connect(read_only=False)
        self._local.con = con
        try:
            con.execute("BEGIN TRANSACTION")
            yield con
            con.execute("COMMIT")
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # already rolled back by DuckDB after a failed statement
            raise
        finally:
            self._local.con = None
            con.close()  # frees the file lock so other processes can read

    def query(self, sql: str, params: list | dict | None = None) -> pd.DataFrame:
        """One read query as a DataFrame; inside a transaction it sees that transaction's writes."""
        return self._read(sql, params, lambda result: result.df())

    def rows(self, sql: str, params: list | dict | None = None) -> list[tuple]:
        """One read query as Python tuples (NULL -> None)."""
        return self._read(sql, params, lambda result: result.fetchall())

    def user_query(self, sql: str) -> pd.DataFrame:
        """SQL a person typed (`i2l query`, a notebook): read-only, on a connection that cannot reach files,
        the network or extensions, nor turn that access back on (DuckDB's PermissionException otherwise)."""
        if getattr(self._local, "con", None) is not None:
            raise ValueError("user SQL cannot run inside a store transaction; run it after the transaction")
        return self._read(sql, None, lambda result: result.df(), user_sql=True)

    def _read(self, sql: str, params, fetch, user_sql: bool = False):
        con = getattr(self._local, "con", None)
        if con is not None and not user_sql:
            return fetch(con.execute(sql, params))
        con = self._connect(read_only=True, user_sql=user_sql)
        try:
            con.execute("BEGIN TRANSACTION READ ONLY")  # `i2l query` must never write
            return fetch(con.execute(sql, params))
        finally:
            con.close()

    # -- schema ------------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        try:
            return int(self.rows("SELECT coalesce(max(version), 0) FROM schema_version")[0][0])
        except duckdb.CatalogException:
            return 0

    def has_migration(self, name: str) -> bool:
        """Whether the named migration (schema.MIGRATIONS) is applied: a store opened read-only is not migrated,
        so readers of a newer column ask this before selecting it."""
        return self.version > [n for n, _ in MIGRATIONS].index(name)

    def migrate(self, upto: int | None = None) -> int:
        """Apply the pending migrations in one transaction; return the resulting schema version."""
        target = len(MIGRATIONS) if upto is None else upto
        with _MIGRATE_LOCK, self.transaction() as con:
            con.execute("CREATE TABLE IF NOT EXISTS schema_version "
                        "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
            current = con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]
            if current > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {current} but this i2l knows only "
                                   f"{len(MIGRATIONS)}; upgrade i2l or use another --db")
            for version in range(current + 1, target + 1):
                name, step = MIGRATIONS[version - 1]
                step(con) if callable(step) else con.execute(step)
                con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, name, now_utc()])
            return max(current, target)

    # -- bulk insert -------------------------------------------------------------------------------

    def _insert(self, table: str, cols: list[str], rows: list[dict], replace: bool = False,
                ignore: bool = False) -> int:
        if not rows:
            return 0
        data = pa.Table.from_pydict({c: [r.get(c) for r in rows] for c in cols})
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE" if ignore else "INSERT"
        name = f"_in_{uuid.uuid4().hex[:8]}"
        col_list = ", ".join(cols)
        with self.transaction() as con:
            con.register(name, data)
            try:
                con.execute(f"{verb} INTO {table} ({col_list}) SELECT {col_list} FROM {name}").fetchall()
            finally:
                con.unregister(name)
        return len(rows)

    # -- runs, checkpoints, stages -----------------------------------------------------------------

    def start_run(self, kind: str, preset: str | None, config: dict | None, run_id: str | None = None,
                  parent_id: str | None = None) -> str:
        """Record a run as 'running' and return its id; a known id (a resumed run) is set running again."""
        run_id = run_id or f"{kind}-{now_utc():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        with self.transaction() as con:
            # the owner: this process, so that a later writer can tell the run was orphaned (fail_orphaned_runs)
            con.execute(
                "INSERT INTO runs (run_id, parent_id, kind, preset, config, status, started_at, host, owner) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET status = 'running', "
                "finished_at = NULL, host = excluded.host, owner = excluded.owner, note = NULL",
                [run_id, parent_id, kind, preset, to_json(config), now_utc(), socket.gethostname(),
                 owner_token()]).fetchall()
        _OPEN_RUNS[run_id] = self.path
        return run_id

    def finish_run(self, run_id: str, status: str = "ok") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, not {status!r}")
        with self.transaction() as con:
            n = con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
                            [status, now_utc(), run_id]).fetchall()[0][0]
        _OPEN_RUNS.pop(run_id, None)
        if n == 0:
            raise ValueError(f"unknown run {run_id!r}; start it with start_run() first")

    def fail_orphaned_runs(self) -> list[str]:
        """Mark failed the runs whose process was killed before finishing them (i2l.store.owner); their ids."""
        return fail_orphaned_runs(self)

    @contextmanager
    def run(self, kind: str, preset: str | None, config: dict | None, run_id: str | None = None,
            parent_id: str | None = None) -> Iterator[str]:
        """`with store.run(...) as run_id:` marks the run ok on exit, failed on an exception."""
        run_id = self.start_run(kind, preset, config, run_id=run_id, parent_id=parent_id)
        try:
            yield run_id
        except BaseException:
            self.finish_run(run_id, "failed")
            raise
        self.finish_run(run_id, "ok")

    def record_checkpoint(self, run_id: str, path: str | Path, step: int, backbone: str, sha256: str,
                          meta: dict | None = None) -> str:
        row = checkpoint_row(run_id, path, step, backbone, sha256, meta)
        self._insert("checkpoints", COLUMNS["checkpoints"], [row], replace=True)
        return row["checkpoint_id"]

    def is_stage_done(self, stage: str, key: str) -> bool:
        return bool(self.rows("SELECT count(*) FROM stages WHERE stage = ? AND key = ?", [stage, key])[0][0])

    def stage_info(self, stage: str, key: str) -> dict | None:
        """The `info` saved by mark_stage_done, or None when the stage has not finished."""
        got = self.rows("SELECT info FROM stages WHERE stage = ? AND key = ?", [stage, key])
        return json.loads(got[0][0]) if got and got[0][0] else ({} if got else None)

    def mark_stage_done(self, stage: str, key: str, info: dict | None = None) -> None:
        """Call inside the stage's transaction so results and the done-mark commit together."""
        self._insert("stages", COLUMNS["stages"], [stage_row(stage, key, info)], replace=True)

    # -- data --------------------------------------------------------------------------------------

    def record_dataset(self, out_dir: str | Path, run_id: str | None = None) -> str:
        """Ingest a prepared data directory (manifest.json + quarantine.parquet); re-ingesting replaces it."""
        from i2l.store.ingest import read_prepared

        d = read_prepared(Path(out_dir))
        dataset_id = d["dataset"]["dataset_id"]
        with self.transaction() as con:
            for table in ("datasets", "dataset_inputs", "shards", "quarantine_counts", "quarantine"):
                con.execute(f"DELETE FROM {table} WHERE dataset_id = ?", [dataset_id]).fetchall()
            self._insert("datasets", list(d["dataset"]) + ["run_id", "recorded_at"],
                         [{**d["dataset"], "run_id": run_id, "recorded_at": now_utc()}])
            for table in ("dataset_inputs", "shards", "quarantine_counts"):
                rows = [{**r, "dataset_id": dataset_id} for r in d[table]]
                self._insert(table, list(rows[0]) if rows else [], rows)
            if d["quarantine"] is not None and d["quarantine"].num_rows:
                q = d["quarantine"]
                q = q.append_column("dataset_id", pa.array([dataset_id] * q.num_rows))
                con.register("_quarantine_in", q)
                cols = "dataset_id, id, source_file, row_index, reason, detail"
                try:
                    con.execute(f"INSERT INTO quarantine ({cols}) SELECT {cols} FROM _quarantine_in")
                finally:
                    con.unregister("_quarantine_in")
        return dataset_id

    def record_styles(self, rows: Iterable[dict]) -> int:
        """rows: style_id, split, description, dataset_id, ref_paths (list of image files)."""
        return self._insert("styles", COLUMNS["styles"], dedupe([style_row(r) for r in rows], "style_id"),
                            replace=True)

    # -- methods, LoRAs, samples, scores -----------------------------------------------------------

    def record_method(self, run_id: str, method: str, wall_s: float | None = None, family: str | None = None,
                      budget_steps: int | None = None, note: str | None = None) -> None:
        """A method compared in a run, with its wall time to obtain one style's LoRA (for v_amortization)."""
        self._insert("methods", COLUMNS["methods"], [method_row(run_id, method, wall_s, family, budget_steps, note)],
                     replace=True)

    def _ensure_methods(self, pairs: set[tuple[str, str]]) -> None:
        self._insert("methods", COLUMNS["methods"], [method_row(r, m) for r, m in sorted(pairs)], ignore=True)

    def record_loras(self, rows: Iterable[dict]) -> list[str]:
        """rows: i2l.store.rows.lora_row's (style_id, method, checkpoint_id, path, sha256, rank, n_refs, norms
        (dict), ref_ids (list)); returns ids (`lora_id` if given, else '<method>:<style_id>:<sha256[:12]>')."""
        out = [stored_lora_row(r) for r in rows]
        self._insert("loras", COLUMNS["loras"], dedupe(out, "lora_id"), replace=True)
        return [r["lora_id"] for r in out]

    def record_samples(self, rows: Iterable[dict]) -> int:
        """rows: sample_id, run_id, method, style_id, prompt, seed, lora_id, image_path, settings (dict)."""
        out = [sample_row(r) for r in rows]
        with self.transaction():
            self._ensure_methods({(r["run_id"], r["method"]) for r in out})
            return self._insert("samples", COLUMNS["samples"], dedupe(out, "sample_id"), replace=True)

    def record_scores(self, rows: Iterable[dict]) -> int:
        """rows: sample_id, metric, value, scorer, scorer_version, status ('ok'|'skipped'), reason.
        A skipped score must carry a reason and no value; an 'ok' score a finite value."""
        out = dedupe([score_row(r) for r in rows], ("sample_id", "metric"))
        return self._insert("scores", COLUMNS["scores"], out, replace=True)

    # -- benchmarks, curves, evaluation losses -----------------------------------------------------

    def record_benchmark(self, name: str, rows: Iterable[dict], device: str,
                         run_id: str | None = None) -> int:
        """Long rows {case, metric, value, unit}; a row without metric/value is wide: each numeric field
        becomes one metric. Unknown fields are kept in `extra`."""
        return self._insert("benchmarks", COLUMNS["benchmarks"], benchmark_rows(name, rows, device, run_id))

    def record_curve(self, run_id: str, rows: Iterable[dict]) -> int:
        """Training curve rows: step, loss, lr, anything else (kept in `extra`); a re-logged step replaces."""
        return self._insert("train_curves", COLUMNS["train_curves"], dedupe(curve_rows(run_id, rows), "step"),
                            replace=True)

    def record_out_of_family(self, rows: Iterable[dict]) -> int:
        """Out-of-family samples (i2l/eval/out_of_family.py): sample_id, run_id, style_id, description, method,
        prompt, seed, image_path, ref_paths (list), margin, scorer; a re-recorded sample replaces."""
        cols = ["sample_id", "run_id", "style_id", "description", "method", "prompt", "seed", "image_path",
                "ref_paths", "margin", "scorer", "created_at"]
        out = [{**r, "ref_paths": to_json(r.get("ref_paths")), "created_at": now_utc()} for r in rows]
        return self._insert("out_of_family", cols, dedupe(out, "sample_id"), replace=True)

    def record_eval_loss(self, run_id: str, rows: Iterable[dict]) -> int:
        """Held-out loss rows: method, style_id, n_refs, steps (per-style budget), wall_s, loss, loss_by_t."""
        out = [eval_loss_row(run_id, r) for r in rows]
        with self.transaction():
            self._ensure_methods({(run_id, r["method"]) for r in out})
            return self._insert("eval_losses", COLUMNS["eval_losses"], out)


def store_path(cfg) -> Path:
    """Default store file of a config: <data_root>/results.duckdb."""
    return Path(cfg.data_root) / "results.duckdb"
