"""The report's figures as PNG bytes (matplotlib, no pyplot state): the sample grid (Figure 3 style), the
amortization plot, the ablation bars and the training curve. Images are opened only inside allowed roots."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

MAX_IMAGE_BYTES = 32 << 20  # sample images are small; anything bigger is not ours
MAX_IMAGE_PIXELS = 4096 * 4096
THUMB = 96  # grid cell side in pixels


def resolve_image(path: str | None, roots: list[Path]) -> Path | None:
    """The file `path` names if it lies inside one of `roots` (relative paths are tried against each root),
    else None: the report never opens files outside the store's and data root's directories."""
    if not path:
        return None
    p = Path(path)
    candidates = [p] if p.is_absolute() else [r / p for r in roots]
    for cand in candidates:
        try:
            real = cand.resolve()
        except OSError:
            continue
        if any(real.is_relative_to(r.resolve()) for r in roots) and real.is_file():
            return real
    return None


def load_thumb(path: str | None, roots: list[Path]) -> np.ndarray | None:
    """A THUMB×THUMB RGB array of the image, or None when missing, outside the roots or not decodable."""
    real = resolve_image(path, roots)
    if real is None or real.stat().st_size > MAX_IMAGE_BYTES:
        return None
    try:
        with Image.open(real) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before decoding the pixels
                return None
            # Small toy images are upscaled with crisp pixels; large ones downscaled smoothly.
            resample = Image.Resampling.NEAREST if max(im.size) <= THUMB else Image.Resampling.LANCZOS
            return np.asarray(im.convert("RGB").resize((THUMB, THUMB), resample))  # (THUMB, THUMB, 3)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def sample_grid(rows: list[dict], methods: list[str], n_refs: int, roots: list[Path]) -> tuple[bytes, int]:
    """Rows of `refs | one output per method` for the same prompt and seed, composed with PIL (a grid of
    images, not a plot). Each row dict: style_id, prompt, seed, refs (paths), images {method: path}.
    Returns (PNG, number of images that could not be shown)."""
    cell, gap, label_w, head_h = THUMB, 6, 170, 30
    n_cols = n_refs + len(methods)
    width = label_w + n_cols * (cell + gap) + gap
    height = head_h + len(rows) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    titles = ["reference"] + [""] * (n_refs - 1) + list(methods)
    for j, title in enumerate(titles):
        x = label_w + gap + j * (cell + gap)
        draw.text((x + cell // 2, head_h - 8), title, fill=(0, 0, 0), font=font, anchor="ms")
    if n_refs:
        x_sep = label_w + gap + n_refs * (cell + gap) - gap // 2
        draw.line([(x_sep, head_h - 4), (x_sep, height - gap)], fill=(120, 120, 120), width=2)
    missing = 0
    for i, row in enumerate(rows):
        y = head_h + gap + i * (cell + gap)
        label = f"{row['style_id']}\n{_wrap(str(row['prompt']), 26)}\nseed {row['seed']}"
        draw.multiline_text((6, y + 4), label, fill=(0, 0, 0), font=font, spacing=3)
        paths = (row["refs"] + [None] * n_refs)[:n_refs] + [row["images"].get(m) for m in methods]
        for j, path in enumerate(paths):
            x = label_w + gap + j * (cell + gap)
            img = load_thumb(path, roots)
            if img is None:
                missing += path is not None or j >= n_refs
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235),
                               outline=(200, 200, 200))
                draw.text((x + cell // 2, y + cell // 2), "n/a", fill=(90, 90, 90), font=font, anchor="mm")
            else:
                canvas.paste(Image.fromarray(img), (x, y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), missing


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])


def amortization_plot(df: pd.DataFrame, quality: str) -> bytes:
    """Quality vs wall time per style: the per-style optimisation curve, i2L's points, style-free baselines
    and sanity checks (a wrong style's i2L LoRA) as horizontal lines. df: v_amortization rows of one run;
    quality: 'eval_loss' or another column."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    d = df.dropna(subset=[quality])
    curve = d[d.family == "per_style"].sort_values("budget_steps")
    if len(curve):
        ax.plot(curve.wall_s, curve[quality], "o-", color="tab:blue", label="per-style LoRA optimisation")
        for _, r in curve.iterrows():
            ax.annotate(f"{int(r.budget_steps)} steps", (r.wall_s, r[quality]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    for _, r in d[d.family == "i2l"].iterrows():
        ax.plot([r.wall_s], [r[quality]], "*", ms=12, label=f"{r.method} (one forward)")
    others = d[~d.family.isin(["per_style", "i2l"])]
    for k, (_, r) in enumerate(others.iterrows()):
        if (r.wall_s or 0) > 0:
            ax.plot([r.wall_s], [r[quality]], "s", label=r.method)
        else:
            kind = "sanity check" if r.family == "sanity" else "no per-style cost"
            ax.axhline(r[quality], ls="--", lw=1, color=f"C{(k + 4) % 10}", label=f"{r.method} ({kind})")
    positive = d.wall_s[d.wall_s > 0]
    if len(positive):
        ax.set_xscale("log")
    ax.set_xlabel("wall time per style (s)")
    ax.set_ylabel(quality.replace("_", " ") + (" (lower is better)" if quality == "eval_loss" else ""))
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def ablation_plot(nref: pd.DataFrame, asym: pd.DataFrame, metric: str) -> bytes:
    """Two bar panels: `metric` by number of references, and without/with asymmetric CFG."""
    fig = Figure(figsize=(7.0, 2.8))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if len(nref):
        ax1.bar([str(n) for n in nref.n_refs], nref[metric], color="tab:purple")
    ax1.set_xlabel("number of references")
    ax1.set_ylabel(metric)
    ax1.set_title("references", fontsize=9)
    if len(asym):
        x = np.arange(len(asym))
        ax2.bar(x - 0.2, asym["off"], 0.4, label="asym CFG off")
        ax2.bar(x + 0.2, asym["on"], 0.4, label="asym CFG on")
        ax2.set_xticks(x, [f"{n} ref" for n in asym.n_refs])
        ax2.legend(fontsize=7)
    ax2.set_title("asymmetric LoRA guidance", fontsize=9)
    return _png(fig)


def curve_plot(df: pd.DataFrame) -> bytes:
    """Training loss (and lr on a twin axis) against step, one line per run."""
    fig = Figure(figsize=(6.0, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    for run_id, g in df.groupby("run_id"):
        ax.plot(g.step, g.loss, label=str(run_id))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)
