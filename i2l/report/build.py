"""`build_report(store, run_id)`: reports/<run>/index.html (self-contained) and report.md from the results
store: Table 1, sample grid, amortization plot, held-out gain by noise level, ablations, training curve,
benchmarks, data summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from i2l.layout import report_dir
from i2l.report.figures import ablation_plot, amortization_plot, curve_plot, sample_grid
from i2l.report.render import Document, Table, fmt, rank_marks
from i2l.store import METRICS, Store, method_sort_key, parse_method, queries
from i2l.store.noise_levels import band_labels, percent

OVERALL_NOTE = ("Overall: for each metric, the methods' means are min-max normalised over the methods "
                "compared in this run (lower-is-better metrics inverted, so 1 = best, 0 = worst), then "
                "averaged over the metrics a method has. Skipped metrics and metrics on which all methods "
                "tie are left out.")


def resolve_run(store: Store, run_id: str | None) -> str:
    """`run_id` if it exists; else the latest top-level run that has samples (or, failing that, any)."""
    if run_id:
        if not queries.run_exists(store, run_id):
            known = queries.recent_run_ids(store)
            raise ValueError(f"no run {run_id!r} in {store.path}; recent runs: {', '.join(known) or 'none'}")
        return run_id
    got = queries.latest_top_level_run(store)
    if got is None:
        raise ValueError(f"no runs in {store.path}; run the pipeline first (`i2l run`)")
    return got


def build_report(store: Store, run_id: str | None = None, out_dir: str | Path | None = None,
                 image_roots: list[Path] | None = None, grid_rows: int = 3) -> Path:
    """Write the report and return the path of index.html. Sample/reference images are read only from
    `image_roots` (default: the store's directory)."""
    run_id = resolve_run(store, run_id)
    family = queries.run_family(store, run_id)
    runs = family.run_id.tolist()
    out_dir = Path(out_dir) if out_dir else report_dir(run_id)  # $I2L_REPORTS_DIR/<run>, else reports/<run>
    roots = [Path(r) for r in (image_roots or [store.path.parent])]
    doc = Document(f"i2l report — {run_id}")
    _runs_section(doc, family)
    eval_run = queries.latest_eval_run(store, runs)
    if eval_run is None:
        doc.para("No evaluation samples were recorded in this run, so there is no Table 1, grid or ablation.",
                 note=True)
    else:
        summary = queries.method_summary(store, eval_run)
        amort = queries.amortization(store, eval_run)
        _table1_section(doc, summary, eval_run)
        _grid_section(doc, store, eval_run, roots, grid_rows)
        _out_of_family_section(doc, store, eval_run, roots)
        _amortization_section(doc, amort)
        _noise_level_section(doc, queries.gains_by_noise_level(store, eval_run))
        _ablation_section(doc, amort)
    _curve_section(doc, store, runs)
    _benchmark_section(doc, store)
    _data_section(doc, store, runs)
    return doc.write(out_dir)


def _runs_section(doc: Document, family: pd.DataFrame) -> None:
    doc.heading("Runs", "runs")
    rows = []
    for r in family.itertuples():
        secs = (r.finished_at - r.started_at).total_seconds() if pd.notna(r.finished_at) else None
        note = getattr(r, "note", None)  # why a run ended when its own process did not say (i2l.store.owner)
        status = f"{r.status}: {note}" if isinstance(note, str) and note else r.status
        rows.append([r.run_id, r.kind, _txt(r.preset), status, str(r.started_at)[:19], fmt(secs, 1)])
    columns = ["run", "kind", "preset", "status", "started (UTC)", "duration (s)"]
    doc.table(Table(columns, rows, table_id="runs"))


def _table1_section(doc: Document, summary: pd.DataFrame, eval_run: str) -> None:
    doc.heading("Table 1: methods × metrics", "table1")
    methods = sorted(summary.method.unique(), key=method_sort_key)
    present = set(summary.metric) - {"overall"}
    metrics = [m for m in METRICS if m in present] + sorted(present - set(METRICS)) + ["overall"]
    cell = {(r.method, r.metric): r for r in summary.itertuples()}
    lower = {m: bool(summary[summary.metric == m].lower_is_better.any()) for m in metrics}
    rows, marks, skipped = [], {}, {}
    for i, method in enumerate(methods):
        row = [method]
        for metric in metrics:
            r = cell.get((method, metric))
            if r is None:
                row.append("–")
            elif r.n_ok:
                row.append(fmt(r.mean, 3) if metric == "overall" else fmt(r.mean))
            elif r.n_skipped:
                row.append("skipped")
                skipped.setdefault(metric, set()).add(str(r.skip_reason))
            else:
                row.append("–")
        rows.append(row)
    for j, metric in enumerate(metrics, start=1):
        values = {i: _mean(cell.get((m, metric))) for i, m in enumerate(methods)}
        marks.update(rank_marks(values, lower[metric], j))
    columns = ["method"] + [f"{m} {'↓' if lower[m] else '↑'}" for m in metrics]
    doc.para(f"Evaluation run {eval_run}. Mean over samples; best per column in bold, second underlined.")
    doc.table(Table(columns, rows, marks, table_id="table1"))
    doc.para(OVERALL_NOTE, note=True)
    doc.bullets([f"{m}: skipped for every sample — {'; '.join(sorted(r))}" for m, r in skipped.items()
                 if all(cell.get((x, m)) is None or not cell[(x, m)].n_ok for x in methods)])


def _txt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _mean(r) -> float | None:
    return None if r is None or not r.n_ok else float(r.mean)


def _grid_section(doc: Document, store: Store, eval_run: str, roots: list[Path], max_rows: int) -> None:
    samples = queries.grid_samples(store, eval_run)
    if samples.empty:
        return
    methods = sorted(samples.method.unique(), key=method_sort_key)
    groups = []
    for (style_id, prompt, seed), g in samples.groupby(["style_id", "prompt", "seed"], dropna=False):
        refs = max((_json_list(s, "refs") for s in g.settings), key=len)
        refs = refs or _json_list(g.ref_paths.iloc[0], None)
        groups.append({"style_id": style_id, "prompt": str(prompt), "seed": seed, "refs": refs,
                           "images": dict(zip(g.method, g.image_path))})
    groups.sort(key=lambda r: (-len(r["images"]), str(r["style_id"])))
    rows = groups[:max_rows]
    n_refs = min(4, max((len(r["refs"]) for r in rows), default=0)) or 1
    png, missing = sample_grid(rows, methods, n_refs, roots)
    doc.heading("Samples: references and each method's output (same prompt and seed)", "grid")
    doc.figure("grid", png, f"Rows: style, prompt, seed. Columns: {n_refs} reference(s), then "
                            + ", ".join(methods) + ".")
    if missing:
        doc.para(f"{missing} image(s) were missing or outside the data directories and are shown as n/a.",
                 note=True)


def _out_of_family_section(doc: Document, store: Store, eval_run: str, roots: list[Path],
                           max_rows: int = 8) -> None:
    """Styles from outside the training family (i2l/eval/out_of_family.py): the grid (references, base, i2L;
    each style's first prompt) and the style margin of each method."""
    rows = queries.out_of_family(store, eval_run)
    if rows.empty:
        return
    from i2l.eval.out_of_family import margin_summary

    summary = margin_summary(rows.to_dict("records"))
    methods = sorted(rows.method.unique(), key=method_sort_key)
    first = rows[rows.prompt == rows.prompt.iloc[0]]
    groups = [{"style_id": sid, "prompt": str(g.prompt.iloc[0]), "seed": g.seed.iloc[0],
               "refs": _json_list(g.ref_paths.iloc[0], None), "images": dict(zip(g.method, g.image_path))}
              for sid, g in first.groupby("style_id")][:max_rows]
    n_refs = min(4, max((len(r["refs"]) for r in groups), default=0)) or 1
    doc.heading("Out-of-family styles: styles unlike any in training", "out_of_family")
    png, missing = sample_grid(groups, methods, n_refs, roots)
    doc.figure("out_of_family_grid", png, f"Foreign styles (other textures, palettes and figures than the toy "
                                          f"world's; never trained on). Columns: {n_refs} reference(s), then "
                                          + ", ".join(methods) + "; the same prompt and seed in every row.")
    if missing:
        doc.para(f"{missing} image(s) were missing or outside the data directories and are shown as n/a.",
                 note=True)
    means = summary["mean_margin"]
    doc.table(Table(["method", "style margin (mean)", "styles"],
                    [[m, fmt(means[m], 4), summary["styles"]] for m in methods], table_id="out_of_family"))
    if summary.get("vs_base"):
        versus = "; ".join(f"{m} − base = {v['minus_base']:+.4f}, above the base on {100 * v['beats_base']:.0f}% "
                           f"of {summary['styles']} styles" for m, v in summary["vs_base"].items())
        doc.para(f"Style margin = cos(sample, own references) − mean cos(sample, the other foreign styles' "
                 f"references) in the scorer's image space, averaged over styles and prompts. The base model draws "
                 f"the same image for every style, so its margin is 0 by construction, as is that of a LoRA that "
                 f"does nothing. {versus}. *_asym: the gray-image LoRA on the negative CFG branch (paper §3.4).")


def _json_list(value, key: str | None) -> list[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    try:
        data = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return []
    data = data.get(key) if key and isinstance(data, dict) else data
    return [str(x) for x in data] if isinstance(data, list) else []


def _amortization_section(doc: Document, amort: pd.DataFrame) -> None:
    doc.heading("Amortization: quality vs wall time per style", "amortization")
    if amort.empty or amort.wall_s.isna().all():
        doc.para("No wall times were recorded for the methods of this run.", note=True)
        return
    quality = "eval_loss" if amort.eval_loss.notna().any() else "overall"
    # a store not yet migrated (opened read-only) still calls i2l_wrong_style 'i2l': only i2l_<N>ref(_asym) are
    family = amort.family.where(amort.family != "i2l", amort.method.map(lambda m: parse_method(m)["family"]))
    d = amort.assign(family=family, _k=amort.method.map(method_sort_key)).sort_values("_k")
    doc.figure("amortization", amortization_plot(d, quality),
               "Per-style LoRA optimisation at increasing step budgets vs i2L's single forward pass.")
    doc.table(Table(["method", "family", "per-style steps", "wall s / style", "held-out loss ↓",
                     "clip_style ↑", "overall ↑"],
                    [[r.method, r.family, fmt(r.budget_steps), fmt(r.wall_s, 3), fmt(r.eval_loss, 4),
                      fmt(r.clip_style), fmt(r.overall, 3)] for r in d.itertuples()],
                    table_id="amortization"))
    doc.bullets(amortization_findings(d, quality))


def amortization_findings(amort: pd.DataFrame, quality: str = "eval_loss") -> list[str]:
    """For each i2L method: how long per-style optimisation needs to match its quality, and the ratio."""
    lower = quality == "eval_loss"
    curve = amort[(amort.family == "per_style") & amort[quality].notna() & (amort.wall_s > 0)]
    curve = curve.sort_values("wall_s")
    out = []
    for r in amort[(amort.family == "i2l") & amort[quality].notna()].itertuples():
        target, wall = getattr(r, quality), r.wall_s
        if curve.empty or not wall or pd.isna(wall):
            continue
        w_match = _match_time(curve.wall_s.tolist(), curve[quality].tolist(), target, lower)
        head = f"{r.method} ({quality} {fmt(target, 4)} in {fmt(wall, 3)} s): per-style optimisation"
        if w_match is None:
            out.append(f"{head} does not reach it within {fmt(curve.wall_s.max(), 2)} s")
        elif w_match == curve.wall_s.iloc[0] and _as_good(curve[quality].iloc[0], target, lower):
            # nothing on the curve before its first budget: the crossing may come sooner, so a bound, not a match
            out.append(f"{head} matches it at its smallest budget already, {fmt(w_match, 2)} s — "
                       f"at most {w_match / wall:.0f}× i2L's time")
        else:
            out.append(f"{head} needs ≈{fmt(w_match, 2)} s to match — {w_match / wall:.0f}× i2L's time")
    return out


def _as_good(value: float, target: float, lower: bool) -> bool:
    return value <= target if lower else value >= target


def _match_time(walls: list[float], values: list[float], target: float, lower: bool) -> float | None:
    # First point of the curve at least as good as the target, interpolated in log(wall time).
    good = [_as_good(v, target, lower) for v in values]
    if not any(good):
        return None
    k = good.index(True)
    if k == 0:
        return walls[0]
    t = (values[k - 1] - target) / (values[k - 1] - values[k])
    return math.exp(math.log(walls[k - 1]) + t * (math.log(walls[k]) - math.log(walls[k - 1])))


def _noise_level_section(doc: Document, gains: list[dict], bands: int = 4) -> None:
    doc.heading("Held-out gain by noise level", "noise-levels")
    if not gains:
        doc.para("This evaluation recorded no held-out loss per timestep (it predates them), so there is no "
                 "breakdown by noise level.", note=True)
        return
    gains = sorted((g for g in gains if parse_method(g["method"])["family"] != "sanity"),
                   key=lambda g: method_sort_key(g["method"]))
    labels = band_labels(bands)
    doc.para("The held-out loss's gain over the base model, split by the timestep t of its fixed grid (t = 0 pure "
             "noise, t = 1 the image), in % of the base's loss: the bands add up to the method's overall gain. "
             "Near t = 0 a model settles the layout and colours, near t = 1 only fine detail is left (patterns, "
             "outlines, texture).")
    doc.table(Table(["method", *labels, "all"],
                    [[g["method"], *[percent(v) for v in g["bands"]], percent(g["gain"])] for g in gains],
                    table_id="noise-levels"))
    doc.bullets(noise_level_findings(gains, labels))


def noise_level_findings(gains: list[dict], labels: list[str]) -> list[str]:
    """The i2L method with the most references against each per-style budget, in the noisiest and the cleanest
    band: whether i2L carries a style's coarse look, its detail, or both."""
    info = {g["method"]: parse_method(g["method"]) for g in gains}
    i2l = [g for g in gains if info[g["method"]]["family"] == "i2l" and not info[g["method"]]["asym"]]
    if not i2l:
        return []
    best = max(i2l, key=lambda g: info[g["method"]]["n_refs"] or 0)
    what = {0: " (layout, colours)", len(labels) - 1: " (fine detail)"} if len(labels) > 1 else {}
    out = []
    for p in (g for g in gains if info[g["method"]]["family"] == "per_style"):
        parts = [f"{percent(best['bands'][b])} against {percent(p['bands'][b])} points in {labels[b]}{what.get(b, '')}"
                 for b in dict.fromkeys((0, len(labels) - 1))
                 if best["bands"][b] is not None and p["bands"][b] is not None]
        if parts:
            out.append(f"{best['method']} against {p['method']}: " + "; ".join(parts))
    return out


def _ablation_section(doc: Document, amort: pd.DataFrame) -> None:
    info = {m: parse_method(m) for m in amort.method}
    i2l = amort[[info[m]["family"] == "i2l" and bool(info[m]["n_refs"]) for m in amort.method]].copy()
    if i2l.empty:
        return
    i2l["n_refs"] = [info[m]["n_refs"] for m in i2l.method]
    i2l["asym"] = [info[m]["asym"] for m in i2l.method]
    metric = "clip_style" if i2l.clip_style.notna().any() else "overall"
    doc.heading("Ablations", "ablations")
    nref = i2l[~i2l.asym].sort_values("n_refs")
    doc.para("Number of references (asymmetric CFG off):")
    doc.table(Table(["method", "references", "clip_style ↑", "clip_text ↑", "overall ↑", "held-out loss ↓"],
                    [[r.method, str(r.n_refs), fmt(r.clip_style), fmt(r.clip_text), fmt(r.overall, 3),
                      fmt(r.eval_loss, 4)] for r in nref.itertuples()], table_id="ablation-refs"))
    pairs = []
    for n, g in i2l.groupby("n_refs"):
        off, on = g[~g.asym], g[g.asym]
        if len(off) and len(on):
            pairs.append({"n_refs": n, "off": off.iloc[0], "on": on.iloc[0]})
    asym = pd.DataFrame([{"n_refs": p["n_refs"], "off": p["off"][metric], "on": p["on"][metric]}
                         for p in pairs])
    if pairs:
        doc.para("Asymmetric LoRA guidance (negative branch: the gray-image LoRA) off vs on:")
        rows = [[str(p["n_refs"])] + [fmt(p[s][m], 3 if m == "overall" else None)
                                      for m in ("clip_style", "clip_text", "overall") for s in ("off", "on")]
                for p in pairs]
        doc.table(Table(["references", "clip_style off", "clip_style on", "clip_text off", "clip_text on",
                         "overall off", "overall on"], rows, table_id="ablation-asym"))
    doc.figure("ablations", ablation_plot(nref, asym, metric), f"{metric} by number of references and with "
                                                               "asymmetric CFG off/on.")


def _curve_section(doc: Document, store: Store, runs: list[str]) -> None:
    df = queries.training_curves(store, runs)
    if df.empty:
        return
    doc.heading("Training curve", "training")
    doc.figure("training", curve_plot(df), "Training loss per step.")
    # curves record steps from 1 (step + 1 after each optimiser step): count the rows, not the last step
    per_run = df.groupby("run_id").agg(steps=("step", "size"), loss=("loss", "last"))
    doc.bullets([f"{run_id}: {int(r.steps)} steps logged, final loss {fmt(r.loss, 4)}"
                 for run_id, r in per_run.iterrows()])


def _benchmark_section(doc: Document, store: Store) -> None:
    df = queries.latest_benchmarks(store)
    doc.heading("Benchmarks (latest per bench, case, metric and device)", "benchmarks")
    if df.empty:
        doc.para("No benchmarks recorded yet (`i2l bench ...`).", note=True)
        return
    doc.table(Table(["bench", "case", "metric", "value", "unit", "device", "time (UTC)"],
                    [[r.bench, _txt(r.case_name), r.metric, fmt(r.value), _txt(r.unit), _txt(r.device),
                      str(r.time)[:19]] for r in df.itertuples()], table_id="benchmarks"))


def _data_section(doc: Document, store: Store, runs: list[str]) -> None:
    df = queries.data_summaries(store, runs)
    scope = "recorded by this run"
    if df.empty:
        df = queries.data_summaries(store)
        scope = "latest in the store"
    doc.heading("Data summary", "data")
    if df.empty:
        doc.para("No prepared dataset recorded yet: the prepare_data flow records it (`i2l run --flow prepare_data`; "
                 "the single command `i2l prepare` does not).", note=True)
        return
    doc.para(f"Prepared datasets ({scope}):")
    doc.table(Table(["dataset", "rows in", "written", "quarantined", "train styles", "val styles", "shards",
                     "bytes"],
                    [[r.dataset_id, fmt(r.rows_in), fmt(r.rows_written), fmt(r.rows_quarantined),
                      fmt(r.styles_train), fmt(r.styles_val), fmt(r.n_shards), fmt(r.shard_bytes, 0)]
                     for r in df.itertuples()], table_id="data"))
    q = queries.quarantine_by_reason(store, df.dataset_id.tolist())
    if q.empty:
        doc.para("Nothing was quarantined.", note=True)
    else:
        doc.para("Quarantined rows by reason:")
        rows = [[r.dataset_id, r.reason, fmt(r.n)] for r in q.itertuples()]
        doc.table(Table(["dataset", "reason", "rows"], rows, table_id="quarantine"))
