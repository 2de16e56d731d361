"""The results store's schema: an ordered list of migrations (tables, then analyst views) and the metric
registry. Version N = the first N migrations applied; never edit a released migration, append a new one."""

from __future__ import annotations

import re
from typing import Any

# Metric registry: lower-is-better metrics are inverted before they enter Overall.
METRICS: dict[str, tuple[bool, str]] = {
    "clip_text": (False, "100·cos(CLIP image, CLIP text of the prompt)"),
    "clip_style": (False, "100·cos(CLIP image, CLIP text of the style description)"),
    "ref_style_sim": (False, "100·cos(CLIP image, mean CLIP embedding of the references)"),
    "leakage": (True, "CLIP score against the references' content prompts minus against its own prompt"),
    "fm_loss": (True, "held-out flow-matching loss"),
    "aesthetic": (False, "LAION improved aesthetic predictor (~1-10)"),
    "pickscore": (False, "PickScore_v1 (logit_scale·cos)"),
    "imagereward": (False, "ImageReward"),
    "hpsv2": (False, "HPSv2"),
    "hpsv3": (False, "HPSv3"),
}

_TABLES = """
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    parent_id VARCHAR,              -- the pipeline run this run belongs to (NULL: top level)
    kind VARCHAR NOT NULL,          -- pipeline | prepare | train | eval | produce | bench | ...
    preset VARCHAR,
    config JSON,
    status VARCHAR NOT NULL,        -- running | ok | failed | cancelled
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP,
    host VARCHAR
);
CREATE TABLE checkpoints (
    checkpoint_id VARCHAR PRIMARY KEY,  -- '<run_id>:<step>'
    run_id VARCHAR, path VARCHAR NOT NULL, step BIGINT, backbone VARCHAR, sha256 VARCHAR, meta JSON,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE datasets (
    dataset_id VARCHAR PRIMARY KEY,     -- i2l.store.ingest.dataset_id: plan fingerprint + shard hashes, 16 hex
    run_id VARCHAR, out_dir VARCHAR NOT NULL,
    rows_in BIGINT, rows_written BIGINT, rows_quarantined BIGINT, styles_train BIGINT, styles_val BIGINT,
    manifest JSON, recorded_at TIMESTAMP NOT NULL
);
CREATE TABLE dataset_inputs (dataset_id VARCHAR, file VARCHAR, rows BIGINT, bytes BIGINT);
CREATE TABLE shards (
    dataset_id VARCHAR, name VARCHAR, split VARCHAR, rows BIGINT, bytes BIGINT, sha256 VARCHAR
);
CREATE TABLE quarantine_counts (dataset_id VARCHAR, reason VARCHAR, n BIGINT);
CREATE TABLE quarantine (
    dataset_id VARCHAR, id VARCHAR, source_file VARCHAR, row_index BIGINT, reason VARCHAR, detail VARCHAR
);
CREATE TABLE styles (
    style_id VARCHAR PRIMARY KEY, split VARCHAR, description VARCHAR, dataset_id VARCHAR,
    ref_paths JSON                      -- reference image files (evaluation references), for report grids
);
CREATE TABLE methods (
    run_id VARCHAR,
    method VARCHAR,                     -- base | mean_lora | per_style@{steps} | i2l_{n}ref[_asym] | ...
    family VARCHAR, budget_steps BIGINT,
    wall_s DOUBLE,                      -- wall time to obtain one style's LoRA (0 for style-free methods)
    note VARCHAR,
    PRIMARY KEY (run_id, method)
);
CREATE TABLE loras (
    lora_id VARCHAR PRIMARY KEY, style_id VARCHAR, method VARCHAR, checkpoint_id VARCHAR, path VARCHAR,
    sha256 VARCHAR, rank INTEGER, n_refs INTEGER, norms JSON, created_at TIMESTAMP NOT NULL
);
CREATE TABLE samples (
    sample_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, method VARCHAR NOT NULL, style_id VARCHAR,
    prompt VARCHAR, seed BIGINT, lora_id VARCHAR, image_path VARCHAR, settings JSON,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE scores (
    sample_id VARCHAR NOT NULL, metric VARCHAR NOT NULL,
    value DOUBLE,                       -- NULL when skipped: a skipped scorer never becomes a number
    scorer VARCHAR, scorer_version VARCHAR,
    status VARCHAR NOT NULL CHECK (status IN ('ok', 'skipped')),
    reason VARCHAR,
    CHECK ((status = 'ok') = (value IS NOT NULL)),
    PRIMARY KEY (sample_id, metric)
);
CREATE TABLE metrics (metric VARCHAR PRIMARY KEY, lower_is_better BOOLEAN NOT NULL, description VARCHAR);
CREATE TABLE benchmarks (
    bench VARCHAR NOT NULL, case_name VARCHAR, metric VARCHAR NOT NULL, value DOUBLE, unit VARCHAR,
    device VARCHAR, time TIMESTAMP NOT NULL, run_id VARCHAR, extra JSON
);
CREATE TABLE train_curves (
    run_id VARCHAR, step BIGINT, loss DOUBLE, lr DOUBLE, extra JSON, time TIMESTAMP,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE eval_losses (
    run_id VARCHAR, method VARCHAR, style_id VARCHAR, n_refs INTEGER, steps BIGINT, wall_s DOUBLE, loss DOUBLE
);
CREATE TABLE stages (
    stage VARCHAR, key VARCHAR, info JSON, done_at TIMESTAMP NOT NULL, PRIMARY KEY (stage, key)
);
"""

def _amortization_view(i2l_rule: str) -> str:
    """v_amortization, one text for the two migrations that create it. `i2l_rule`: the CASE branches that name
    i2L methods when the methods table gives no family ("views" took every i2l* name; "sanity_family" only
    i2l_<N>ref(_asym), and calls i2l_wrong_style a sanity check)."""
    return """
CREATE OR REPLACE VIEW v_amortization AS
WITH el AS (
    SELECT run_id, method, avg(loss) AS eval_loss, avg(wall_s) AS wall_s, max(steps) AS steps,
           count(DISTINCT style_id) AS n_styles
    FROM eval_losses GROUP BY run_id, method
), q AS (
    SELECT run_id, method,
           max(mean) FILTER (WHERE metric = 'overall') AS overall,
           max(mean) FILTER (WHERE metric = 'clip_style') AS clip_style,
           max(mean) FILTER (WHERE metric = 'clip_text') AS clip_text
    FROM v_method_summary GROUP BY run_id, method
), k AS (
    SELECT run_id, method FROM el UNION SELECT run_id, method FROM q UNION SELECT run_id, method FROM methods
)
SELECT k.run_id, k.method,
       coalesce(md.family, CASE WHEN k.method LIKE 'per\\_style@%' ESCAPE '\\' THEN 'per_style'
                                I2L_RULE ELSE k.method END) AS family,
       coalesce(md.budget_steps, nullif(el.steps, 0)) AS budget_steps,
       coalesce(el.wall_s, md.wall_s) AS wall_s,
       el.eval_loss, el.n_styles, q.clip_style, q.clip_text, q.overall
FROM k LEFT JOIN el USING (run_id, method) LEFT JOIN q USING (run_id, method)
     LEFT JOIN methods md USING (run_id, method);
""".replace("I2L_RULE", i2l_rule)


# Overall: per (run, metric), each method's mean is min-max normalised over the methods of that run
# (lower-is-better metrics inverted, so 1 = best); Overall = mean over the metrics the method has.
# Metrics on which every method ties (or only one method has) carry no ranking and are left out.
_VIEWS = """
CREATE OR REPLACE VIEW v_metric_means AS
SELECT s.run_id, s.method, sc.metric,
       avg(sc.value) FILTER (WHERE sc.status = 'ok') AS mean,
       stddev_samp(sc.value) FILTER (WHERE sc.status = 'ok') AS std,
       count(*) FILTER (WHERE sc.status = 'ok') AS n_ok,
       count(*) FILTER (WHERE sc.status = 'skipped') AS n_skipped,
       min(sc.reason) FILTER (WHERE sc.status = 'skipped') AS skip_reason,
       min(sc.scorer) AS scorer, min(sc.scorer_version) AS scorer_version
FROM samples s JOIN scores sc USING (sample_id)
GROUP BY s.run_id, s.method, sc.metric;

CREATE OR REPLACE VIEW v_method_summary AS
WITH m AS (
    SELECT mm.*, coalesce(mt.lower_is_better, false) AS lower_is_better
    FROM v_metric_means mm LEFT JOIN metrics mt USING (metric)
), rng AS (
    SELECT run_id, metric, min(mean) AS lo, max(mean) AS hi
    FROM m WHERE mean IS NOT NULL GROUP BY run_id, metric
), norm AS (
    SELECT m.*, CASE
        WHEN m.mean IS NULL OR r.hi = r.lo THEN NULL
        WHEN m.lower_is_better THEN (r.hi - m.mean) / (r.hi - r.lo)
        ELSE (m.mean - r.lo) / (r.hi - r.lo) END AS normalized
    FROM m LEFT JOIN rng r USING (run_id, metric)
)
SELECT run_id, method, metric, mean, std, n_ok, n_skipped, skip_reason, lower_is_better, normalized,
       scorer, scorer_version
FROM norm
UNION ALL
SELECT run_id, method, 'overall', avg(normalized), NULL, count(normalized), 0, NULL, false, avg(normalized),
       'i2l.store', 'minmax-v1'
FROM norm GROUP BY run_id, method;

CREATE OR REPLACE VIEW v_style_breakdown AS
SELECT s.run_id, s.style_id, st.description AS style, st.split, s.method, sc.metric,
       avg(sc.value) FILTER (WHERE sc.status = 'ok') AS mean,
       count(*) FILTER (WHERE sc.status = 'ok') AS n_ok,
       count(*) FILTER (WHERE sc.status = 'skipped') AS n_skipped
FROM samples s JOIN scores sc USING (sample_id) LEFT JOIN styles st USING (style_id)
GROUP BY s.run_id, s.style_id, st.description, st.split, s.method, sc.metric;

""" + _amortization_view("WHEN k.method LIKE 'i2l%' THEN 'i2l'") + """

CREATE OR REPLACE VIEW v_benchmarks AS
SELECT bench, case_name, metric, value, unit, device, time, run_id,
       count(*) OVER (PARTITION BY bench, case_name, metric, device) AS n_recorded
FROM benchmarks
QUALIFY row_number() OVER (PARTITION BY bench, case_name, metric, device ORDER BY time DESC) = 1;

CREATE OR REPLACE VIEW v_data_summary AS
SELECT d.dataset_id, d.run_id, d.out_dir, d.rows_in, d.rows_written, d.rows_quarantined,
       d.styles_train, d.styles_val, d.recorded_at,
       (SELECT count(*) FROM shards sh WHERE sh.dataset_id = d.dataset_id) AS n_shards,
       (SELECT sum(bytes) FROM shards sh WHERE sh.dataset_id = d.dataset_id) AS shard_bytes
FROM datasets d;

CREATE OR REPLACE VIEW v_quarantine_by_reason AS
SELECT dataset_id, reason, n FROM quarantine_counts;
"""


# v_amortization again, with families as parse_method names them: only i2l_<N>ref(_asym) is an i2L method;
# i2l_wrong_style (a wrong style's i2L LoRA, a sanity check) is 'sanity'. Methods rows recorded before this
# migration with family 'i2l' for other names are corrected in place.
_SANITY_FAMILY = """
UPDATE methods SET family = CASE WHEN method = 'i2l_wrong_style' THEN 'sanity' ELSE method END
WHERE family = 'i2l' AND NOT regexp_full_match(method, 'i2l_[0-9]+ref(_asym)?');

""" + _amortization_view(
    "WHEN regexp_full_match(k.method, 'i2l_[0-9]+ref(_asym)?') THEN 'i2l' "
    "WHEN k.method = 'i2l_wrong_style' THEN 'sanity'")



# One row per image the out-of-family evaluation drew: a foreign style (i2l/toy/foreign.py, never trained on),
# a method (base | i2l_<n>ref), the same prompts and seeds for every style and method, and its style margin:
# cos(image, own references) - mean cos(image, the other foreign styles' references) in the scorer's image space.
_OUT_OF_FAMILY = """
CREATE TABLE IF NOT EXISTS out_of_family (
    sample_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, style_id VARCHAR NOT NULL, description VARCHAR,
    method VARCHAR NOT NULL, prompt VARCHAR, seed BIGINT, image_path VARCHAR, ref_paths JSON,
    margin DOUBLE, scorer VARCHAR, created_at TIMESTAMP NOT NULL
);
"""


def _seed_metrics(con) -> None:
    con.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?)",
                    [[m, lower, desc] for m, (lower, desc) in METRICS.items()])


# (name, SQL or callable(con)) in order; the store records each applied one in schema_version.
MIGRATIONS: list[tuple[str, Any]] = [
    ("tables", _TABLES),
    ("metrics", _seed_metrics),
    ("views", _VIEWS),
    # the catalog of produced LoRAs names the reference images each was predicted from
    ("loras_ref_ids", "ALTER TABLE loras ADD COLUMN IF NOT EXISTS ref_ids JSON"),
    # i2l_wrong_style is a sanity check, not an i2L method (amortization table and plot)
    ("sanity_family", _SANITY_FAMILY),
    # samples on styles from outside the training family (i2l/eval/out_of_family.py)
    ("out_of_family", _OUT_OF_FAMILY),
    # who runs a run (i2l/store/owner.py), and why a run ended as it did when its own process did not say
    ("runs_owner", ("ALTER TABLE runs ADD COLUMN IF NOT EXISTS owner VARCHAR; "
                    "ALTER TABLE runs ADD COLUMN IF NOT EXISTS note VARCHAR")),
    # the held-out loss at each timestep of its fixed grid (t_k = (k + 0.5) / K ascending; NULL in older rows)
    ("eval_losses_by_t", "ALTER TABLE eval_losses ADD COLUMN IF NOT EXISTS loss_by_t DOUBLE[]"),
]

# Canonical method order for tables and grids (names used across the project).
METHOD_ORDER = ("base", "mean_lora", "gray_lora", "adapter", "per_style", "i2l_1ref", "i2l_4ref",
                "i2l_1ref_asym", "i2l_4ref_asym")


# Held-out-loss sanity checks named like i2L methods but not one (i2l.eval.methods.heldout_losses).
SANITY_METHODS = ("i2l_wrong_style",)


def parse_method(method: str) -> dict[str, Any]:
    """Split a method name into family, per-style step budget, reference count and asymmetric-CFG flag."""
    out: dict[str, Any] = {"family": method, "budget_steps": None, "n_refs": None, "asym": False}
    if method.startswith("per_style@"):
        steps = method.split("@", 1)[1]
        out.update(family="per_style", budget_steps=int(steps) if steps.isdigit() else None)
    elif m := re.fullmatch(r"i2l_(\d+)ref(_asym)?", method):
        out.update(family="i2l", n_refs=int(m.group(1)), asym=bool(m.group(2)))
    elif method in SANITY_METHODS:
        out.update(family="sanity")
    return out


def method_sort_key(method: str) -> tuple:
    """Order methods as METHOD_ORDER, per-style budgets ascending, unknown names last (alphabetical)."""
    info = parse_method(method)
    name = "per_style" if info["family"] == "per_style" else method
    rank = METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
    return rank, info["budget_steps"] or 0, method
