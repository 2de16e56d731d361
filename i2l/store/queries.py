"""The store's read queries, by what they answer (runs and their families, Table 1, amortization, samples for the
grid, curves, benchmarks, data): the report and the command line ask these and never write SQL of their own."""

from __future__ import annotations

import duckdb
import pandas as pd

from i2l.store.results import Store

# The run and every run below it (parent_id chain).
_FAMILY = """WITH RECURSIVE fam(run_id) AS (SELECT run_id FROM runs WHERE run_id = ?
    UNION SELECT r.run_id FROM runs r JOIN fam f ON r.parent_id = f.run_id)"""


def user_query(store: Store, sql: str) -> pd.DataFrame:
    """One read-only statement a user typed (`i2l query`), with no access outside the store (see
    `Store.user_query`); a bad or refused one is a ValueError naming DuckDB's reason on one line."""
    try:
        return store.user_query(sql)
    except duckdb.Error as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]  # the lines after it point into the SQL
        if "not a valid DuckDB database" in reason or "Is a directory" in reason:
            reason += "; pass a results store written by i2l (--db)"
        raise ValueError(f"query failed: {reason}") from None


# ----- runs ------------------------------------------------------------------------------------------------

def run_exists(store: Store, run_id: str) -> bool:
    return bool(store.rows("SELECT count(*) FROM runs WHERE run_id = ?", [run_id])[0][0])


def recent_run_ids(store: Store, limit: int = 5) -> list[str]:
    """The ids of the latest runs started, newest first."""
    return [r[0] for r in store.rows("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT ?", [limit])]


def latest_top_level_run(store: Store) -> str | None:
    """The latest top-level run whose family has evaluation samples, else the latest top-level run."""
    got = store.rows("""
        WITH RECURSIVE fam(top, run_id) AS (
            SELECT run_id, run_id FROM runs WHERE parent_id IS NULL
            UNION SELECT f.top, r.run_id FROM runs r JOIN fam f ON r.parent_id = f.run_id)
        SELECT r.run_id FROM runs r
        WHERE r.parent_id IS NULL
        ORDER BY EXISTS (SELECT 1 FROM fam f JOIN samples s ON s.run_id = f.run_id
                         WHERE f.top = r.run_id) DESC,
                 r.started_at DESC LIMIT 1""")
    return got[0][0] if got else None


def run_family(store: Store, run_id: str) -> pd.DataFrame:
    """The run and all runs below it (parent_id chain), oldest first: every column of `runs`."""
    return store.query(f"{_FAMILY} SELECT * FROM runs WHERE run_id IN (SELECT run_id FROM fam) "
                       "ORDER BY started_at, run_id", [run_id])


def latest_eval_run(store: Store, runs: list[str]) -> str | None:
    """Of `runs`, the one whose evaluation samples were recorded last; None if none has samples."""
    got = store.rows("SELECT run_id FROM samples WHERE list_contains(?, run_id) GROUP BY run_id "
                     "ORDER BY max(created_at) DESC LIMIT 1", [runs])
    return got[0][0] if got else None


# ----- an evaluation run -----------------------------------------------------------------------------------

def method_summary(store: Store, run_id: str) -> pd.DataFrame:
    """Table 1 of an evaluation run, long (v_method_summary: method, metric incl. 'overall', mean, ...)."""
    return store.query("SELECT * FROM v_method_summary WHERE run_id = ?", [run_id])


def amortization(store: Store, run_id: str) -> pd.DataFrame:
    """Per method of an evaluation run: family, per-style budget, wall time per style, quality (v_amortization)."""
    return store.query("SELECT * FROM v_amortization WHERE run_id = ?", [run_id])


def gains_by_noise_level(store: Store, run_id: str, bands: int = 4) -> list[dict]:
    """An evaluation run's held-out gain over the base model per band of t (i2l.store.noise_levels)."""
    from i2l.store.noise_levels import gains_by_noise_level as gains

    if not store.has_migration("eval_losses_by_t"):  # written before the column, opened read-only: no breakdown
        return []
    rows = store.rows("SELECT method, style_id, loss_by_t FROM eval_losses WHERE run_id = ? AND loss_by_t IS NOT NULL "
                      "ORDER BY method, style_id", [run_id])
    return gains([{"method": m, "style_id": s, "loss_by_t": v} for m, s, v in rows], bands)


def grid_samples(store: Store, run_id: str) -> pd.DataFrame:
    """An evaluation run's samples with their style's reference paths: style_id, prompt, seed, method,
    image_path, settings (JSON), ref_paths (JSON)."""
    return store.query("""
        SELECT s.style_id, s.prompt, s.seed, s.method, s.image_path, s.settings, st.ref_paths
        FROM samples s LEFT JOIN styles st USING (style_id) WHERE s.run_id = ?""", [run_id])


def out_of_family(store: Store, run_id: str) -> pd.DataFrame:
    """An evaluation run's out-of-family samples (i2l/eval/out_of_family.py), by style, method and seed."""
    return store.query("SELECT * FROM out_of_family WHERE run_id = ? ORDER BY style_id, method, seed, prompt",
                       [run_id])


# ----- training, benchmarks, data --------------------------------------------------------------------------

def training_curves(store: Store, runs: list[str]) -> pd.DataFrame:
    """run_id, step, loss, lr of `runs`' logged steps with a positive loss, by run and step."""
    return store.query("SELECT run_id, step, loss, lr FROM train_curves WHERE list_contains(?, run_id) "
                       "AND loss > 0 ORDER BY run_id, step", [runs])


def latest_benchmarks(store: Store) -> pd.DataFrame:
    """The latest value of every (bench, case, metric, device) (v_benchmarks)."""
    return store.query("SELECT * FROM v_benchmarks ORDER BY bench, case_name, metric, device")


def data_summaries(store: Store, runs: list[str] | None = None) -> pd.DataFrame:
    """The prepared datasets `runs` recorded, oldest first; runs None: the latest dataset in the store."""
    if runs is None:
        return store.query("SELECT * FROM v_data_summary ORDER BY recorded_at DESC LIMIT 1")
    return store.query("SELECT * FROM v_data_summary WHERE list_contains(?, run_id) ORDER BY recorded_at", [runs])


def quarantine_by_reason(store: Store, dataset_ids: list[str]) -> pd.DataFrame:
    """dataset_id, reason, n: the rows each dataset quarantined, most frequent reason first."""
    return store.query("SELECT dataset_id, reason, n FROM v_quarantine_by_reason WHERE list_contains(?, dataset_id) "
                       "ORDER BY dataset_id, n DESC, reason", [dataset_ids])
