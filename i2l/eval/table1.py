"""Table 1 of an evaluation run: per method, the mean of each scored metric, the held-out FM loss and the wall
time to make one style's conditioning; and its text form, printed when the stage ends."""

from __future__ import annotations

from i2l.eval.methods import Conditioning


def table1_rows(conds: list[Conditioning], sample_rows: list[dict], score_rows: list[dict],
                losses: list[dict]) -> list[dict]:
    """Per method: mean of each ok metric, held-out FM loss and wall time per style."""
    method_of = {r["sample_id"]: r["method"] for r in sample_rows}
    acc: dict[tuple[str, str], list[float]] = {}
    for r in score_rows:
        if r["status"] == "ok":
            acc.setdefault((method_of[r["sample_id"]], r["metric"]), []).append(r["value"])
    for r in losses:
        acc.setdefault((r["method"], "fm_loss"), []).append(r["loss"])
    out = []
    for c in conds:
        row = {"method": c.method, "wall_s": c.mean_wall_s}
        for (m, metric), vals in acc.items():
            if m == c.method:
                row[metric] = sum(vals) / len(vals)
        out.append(row)
    return out


def format_table1(summary: list[dict]) -> str:
    """table1_rows as a fixed-width text table (metrics as columns, "-" where a method has none)."""
    cols = ["clip_style", "clip_text", "ref_style_sim", "leakage", "fm_loss"]
    lines = [f"{'method':<16}" + "".join(f"{c:>14}" for c in cols) + f"{'wall s/style':>14}"]
    for r in summary:
        vals = "".join(f"{r[c]:>14.4f}" if c in r else f"{'-':>14}" for c in cols)
        lines.append(f"{r['method']:<16}{vals}{r['wall_s']:>14.3f}")
    return "\n".join(lines)
