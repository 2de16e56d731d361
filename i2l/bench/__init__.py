"""Benchmarks: one module per measured stage (`python -m i2l.bench.<name>`), each with `add_arguments(p)` and
`run(args) -> list[dict]`, measuring i2l against the plain baseline it replaces, side by side in one run."""


def format_rows(rows: list[dict]) -> str:
    """The common table of long-format rows {case, metric, value, unit[, goal, goal_met]}."""
    w = max([36] + [len(str(r.get("case", ""))) + 2 for r in rows])  # set-up prefixed cases are long
    lines = [f"{'case':<{w}}{'metric':<22}{'value':>14}  {'unit':<8} goal"]
    for r in rows:
        v = r.get("value")
        vs = f"{v:>14.4g}" if isinstance(v, (int, float)) else f"{v!s:>14}"
        goal = f"{r['goal']} ({'met' if r.get('goal_met') else 'NOT met'})" if r.get("goal") else ""
        lines.append(f"{r.get('case', '')!s:<{w}}{r.get('metric', '')!s:<22}{vs}  {r.get('unit', '')!s:<8} {goal}")
    return "\n".join(lines)
