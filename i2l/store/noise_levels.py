"""Where along the noise levels a method's held-out gain lies. The held-out FM loss is measured on a fixed grid of
timesteps t_k = (k + 0.5) / K (t = 0 is pure noise, t = 1 the image; i2l.eval.heldout_loss). Near t = 0 a model
decides the image's layout and colours; near t = 1 only fine detail is left (patterns, outlines, texture). Split
into equal bands of t, the gain over the base model shows whether a LoRA carries a style's coarse look, its detail,
or both: the evaluation's summary and the report read it from here.

Each band's figure is the base's loss minus the method's, summed over the band's timesteps, as a percentage of the
base's loss summed over all of them, with every per-t loss first averaged over the styles both methods were
measured on. So the bands add up to the method's overall gain (the negative of its "vs base" figure)."""

from __future__ import annotations

import itertools
import math


def band_labels(bands: int = 4) -> list[str]:
    """'t < 0.25', '0.25 ≤ t < 0.5', ..., 't ≥ 0.75' for 4 bands."""
    edges = [f"{b / bands:.3g}" for b in range(1, bands)]
    if bands == 1:
        return ["all t"]
    inner = [f"{lo} ≤ t < {hi}" for lo, hi in itertools.pairwise(edges)]
    return [f"t < {edges[0]}", *inner, f"t ≥ {edges[-1]}"]


def gains_by_noise_level(rows: list[dict], bands: int = 4, base: str = "base") -> list[dict]:
    """rows {method, style_id, loss_by_t} (eval_losses; rows without loss_by_t are left out) -> one dict per
    method other than `base`, in first-seen order: {method, styles, gain (the bands' sum), bands: [per band, in
    % of the base's loss; None for a band holding no timestep of the grid]}. [] without a base to compare to."""
    by: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r.get("loss_by_t") is not None and len(r["loss_by_t"]):
            by.setdefault(r["method"], {})[r["style_id"]] = [float(v) for v in r["loss_by_t"]]
    ref = by.pop(base, None)
    if not ref:
        return []
    out = []
    for method, per_style in by.items():
        styles = [s for s in per_style if s in ref and len(per_style[s]) == len(ref[s])]
        if not styles or len({len(ref[s]) for s in styles}) != 1:
            continue  # nothing in common with the base, or grids of different sizes: no like-for-like sum
        K = len(ref[styles[0]])
        b = [sum(ref[s][k] for s in styles) / len(styles) for k in range(K)]  # (K,) base, mean over styles
        m = [sum(per_style[s][k] for s in styles) / len(styles) for k in range(K)]
        total = sum(b)
        band_of = [min(int((k + 0.5) / K * bands), bands - 1) for k in range(K)]
        got: list[float | None] = [None] * bands
        for k in range(K):
            got[band_of[k]] = (got[band_of[k]] or 0.0) + 100 * (b[k] - m[k]) / total
        out.append({"method": method, "styles": len(styles), "bands": got,
                    "gain": math.fsum(g for g in got if g is not None)})
    return out


def percent(v: float | None) -> str:
    """A band's figure as tables show it: one decimal, '–' for an empty band, 0.0 rather than -0.0."""
    return "–" if v is None else f"{round(v, 1) + 0.0:.1f}"


def format_gains_by_noise_level(gains: list[dict], bands: int = 4) -> str:
    """gains_by_noise_level as a text table (the command line's)."""
    labels = band_labels(bands)
    width = max(len(x) for x in labels) + 2
    lines = ["held-out gain over the base by noise level (% of the base's loss; t = 0 noise, t = 1 the image)",
             f"{'method':<22}" + "".join(f"{x:>{width}}" for x in labels) + f"{'all':>8}"]
    for g in gains:
        cells = "".join(f"{percent(v):>{width}}" for v in g["bands"])
        lines.append(f"{g['method']:<22}{cells}{percent(g['gain']):>8}")
    return "\n".join(lines)
