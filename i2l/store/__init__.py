"""The results store: one DuckDB file (default `<data_root>/results.duckdb`) holding every run's results.

Contract:
    store = Store(path)                      # creates/migrates (schema_version + ordered MIGRATIONS), then
                                             # fail_orphaned_runs(): runs whose process was killed -> failed
    with store.transaction() as con: ...     # commit on success, rollback on exception; the writer
                                             # helpers called inside join it, so a stage's results
                                             # land whole or not at all
    run_id = store.start_run(kind, preset, config, run_id=None, parent_id=None)
    store.finish_run(run_id, status)         # status: ok | failed | cancelled
    with store.run(kind, preset, config) as run_id: ...   # ok on exit, failed on exception
    fail_open_runs()                         # at a termination signal: this process's unfinished runs -> failed
    store.record_checkpoint(run_id, path, step, backbone, sha256, meta) -> checkpoint_id
    store.record_dataset(out_dir, run_id=None) -> dataset_id      # manifest.json + quarantine.parquet
    store.record_styles(rows)        # style_id, split, description, dataset_id, ref_paths
    store.record_method(run_id, method, wall_s, family=None, budget_steps=None, note=None)
    store.record_loras(rows) -> ids  # style_id, method, checkpoint_id, path, sha256, rank, n_refs, norms
    store.record_samples(rows)       # sample_id, run_id, method, style_id, prompt, seed, lora_id, image_path,
                                     # settings (dict; optional "refs": reference image paths for grids)
    store.record_scores(rows)        # sample_id, metric, value|None, scorer, scorer_version, status, reason
    store.record_benchmark(name, rows, device, run_id=None)   # rows {case, metric, value, unit} (or wide)
    store.record_curve(run_id, rows)                          # step, loss, lr, extras
    store.record_eval_loss(run_id, rows)                      # method, style_id, n_refs, steps, wall_s, loss[, loss_by_t]
    store.is_stage_done(stage, key); store.mark_stage_done(stage, key, info)
    Store(path, read_only=True).query(sql, params) -> pandas.DataFrame
    i2l.store.rows: one row builder per table (e.g. lora_row), which the writers above store
    i2l.store.queries: the read queries the report and the CLI ask (run_family, method_summary, ...)

Concurrency: DuckDB lets one process hold a file read-write and then no other process may open it. So the
store never keeps a connection: each outermost transaction and each query opens the file, works, and closes
it. Writes are short, and an opener that finds the file locked retries for up to `lock_timeout_s` (60 s), so
a reader in another process waits at most for the current write transaction, and vice versa. Threads of one
process share the open database and read committed snapshots without waiting. Times are UTC.

Views: v_method_summary (Table 1, long: run_id, method, metric incl. 'overall', mean, normalized, ...),
v_style_breakdown, v_amortization, v_benchmarks (latest per bench/case/metric/device), v_data_summary,
v_quarantine_by_reason. Overall = per run and metric, min-max normalise the methods' means (lower-is-better
metrics inverted, 1 = best), then average over the metrics a method has; metrics where all methods tie and
skipped metrics (value NULL, status 'skipped', reason kept) are left out.
"""

from i2l.store.results import (
    RUN_STATUSES,
    Store,
    StoreBusyError,
    fail_open_runs,
    now_utc,
    store_path,
)
from i2l.store.schema import METHOD_ORDER, METRICS, MIGRATIONS, method_sort_key, parse_method

__all__ = [
           "METHOD_ORDER",
           "METRICS",
           "MIGRATIONS",
           "RUN_STATUSES",
           "Store",
           "StoreBusyError",
           "fail_open_runs",
           "method_sort_key",
           "now_utc",
           "parse_method",
           "store_path",
]
