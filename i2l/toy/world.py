"""The toy world: procedural styles x contents written in the exact MegaStyle parquet layout.

A style = palette + background pattern (kind, frequency, angle) + outline + finish; a content =
shape + count + size + position. Deterministic from the seed: same seed => same bytes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from i2l.config import ToyWorldConfig
from i2l.io import atomic_path, atomic_tmp, replace_durably

ROWS_PER_STYLE = 8  # as in MegaStyle: 8 contents per style, consecutive rows
# A writer process of its own pays ~2 s to start (numpy, PIL, pyarrow) and writes ~500 rows/s on a core: worth it
# from a few thousand rows (make run's 16 000 rows: ~30 s on one core)
ROWS_PER_WRITER = 4000

COLORS = {
    "red": (214, 48, 49), "orange": (240, 140, 30), "yellow": (246, 214, 60), "lime": (150, 220, 60),
    "green": (40, 150, 70), "teal": (20, 150, 150), "sky blue": (110, 180, 240), "navy": (30, 40, 110),
    "purple": (130, 60, 170), "pink": (240, 130, 180), "brown": (120, 75, 40), "cream": (245, 235, 205),
    "charcoal": (50, 50, 55), "white": (250, 250, 250), "maroon": (110, 20, 40), "gray": (140, 140, 140),
}
# Figure/ground contrast, as in most illustrations: backgrounds (and their patterns) are light, shapes dark.
# It gives content a style-independent first-order signal (a dark blob where the prompt puts the shape); with
# foreground and background drawn from one palette the mean image given a prompt was flat, and the toy backbone
# learned to ignore its prompt.
_LUMA = {k: 0.299 * r + 0.587 * g + 0.114 * b for k, (r, g, b) in COLORS.items()}
LIGHT = tuple(k for k in COLORS if _LUMA[k] >= 130)  # orange, yellow, lime, sky blue, pink, cream, white, gray
DARK = tuple(k for k in COLORS if _LUMA[k] < 130)
# A pattern must show on its ground. Cream and white are 48 apart in RGB (the next closest light pair, orange and
# yellow, 80): cream dots on white were 5-45 levels from their ground, which a viewer barely sees and a per-pixel
# loss barely weighs, so no model trained on them drew them (docs/results.md, "Can the toy backbone render every
# held-out style?"). Such a pair gets the next light colour that shows instead. An outline must show on its ground
# too: a thick white ring on a white ground is not there at all, on cream 48 levels faint (107 of make run's 2000
# styles had one); it is drawn black instead, at its width.
MIN_CONTRAST = 64.0  # Euclidean distance in RGB
PATTERNS = ("plain", "horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard",
            "polka dots", "grid lines")
FREQUENCIES = ("wide", "fine")
OUTLINES = ("no", "thin black", "thick black", "thick white")
OUTLINE_WIDTH = {"no": 0.0, "thin black": 0.025, "thick black": 0.055, "thick white": 0.055}  # of the image side
OUTLINE_RGB = {"thin black": (15, 15, 15), "thick black": (15, 15, 15), "thick white": COLORS["white"]}
FINISHES = ("flat", "grainy", "vignette", "glossy gradient")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
SINGLE_POSITIONS = ("in the center", "at the top left", "at the top right", "at the bottom left",
                    "at the bottom right")
PAIR_POSITIONS = ("at the top", "in the middle", "at the bottom")
MEDIA = ("poster", "print", "tile", "sticker", "card", "mural")
MOODS = ("bold", "calm", "playful", "retro", "crisp", "moody")


@dataclass(frozen=True)
class ToyStyle:
    """One procedural style of the toy world: the visual parameters shared by all its images."""

    background: str
    pattern_color: str
    foreground: str
    pattern: str
    frequency: str
    angle: int  # degrees, for diagonal stripes (45 or 135)
    outline: str
    finish: str
    mood: str
    medium: str

    def look(self) -> tuple:
        """What `generate_styles` keeps distinct between a world's styles (mood and medium only name them)."""
        return (self.background, self.pattern_color, self.foreground, self.pattern, self.frequency, self.outline,
                self.finish)

    def describe(self) -> str:
        """MegaStyle-like style description ("In the style of ...")."""
        if self.pattern == "plain":
            bg = f"a plain {self.background} background"
        else:
            slant = {45: " rising to the right", 135: " rising to the left"}.get(self.angle, "")
            bg = (f"a {self.background} background with {self.frequency} {self.pattern_color} "
                  f"{self.pattern}{slant if self.pattern == 'diagonal stripes' else ''}")
        outline = "no outlines" if self.outline == "no" else f"{self.outline} outlines"
        return (f"In the style of a {self.mood} {self.medium}: {self.background} and {self.foreground} palette, "
                f"{bg}, solid {self.foreground} shapes with {outline}, and a {self.finish} finish.")


@dataclass(frozen=True)
class Content:
    shape: str
    count: int
    size: str
    position: str

    def describe(self) -> str:
        """Content prompt, e.g. "two small stars at the top"."""
        noun = self.shape + ("es" if self.count == 2 and self.shape.endswith("s") else "s" if self.count == 2 else "")
        return f"{'one' if self.count == 1 else 'two'} {self.size} {noun} {self.position}"


def sample_style(rng: np.random.Generator) -> ToyStyle:
    bg, pc = rng.choice(len(LIGHT), size=2, replace=False)
    fg = rng.integers(len(DARK))
    style = ToyStyle(
        background=LIGHT[bg], pattern_color=LIGHT[pc], foreground=DARK[fg],
        pattern=PATTERNS[rng.integers(len(PATTERNS))], frequency=FREQUENCIES[rng.integers(2)],
        angle=int(rng.choice([45, 135])), outline=OUTLINES[rng.integers(len(OUTLINES))],
        finish=FINISHES[rng.integers(len(FINISHES))], mood=MOODS[rng.integers(len(MOODS))],
        medium=MEDIA[rng.integers(len(MEDIA))],
    )
    if style.pattern != "plain":  # a plain ground draws no pattern: its colour does not matter
        style = replace(style, pattern_color=visible_pattern_color(style.background, style.pattern_color))
    return replace(style, outline=visible_outline(style.background, style.outline))


def visible_pattern_color(background: str, pattern_color: str) -> str:
    """`pattern_color`, or the first light colour after it (in LIGHT's order) that shows on `background`. Chosen
    without drawing from the rng, so that every other style of a seed's world stays as it was."""
    first = LIGHT.index(pattern_color)
    for k in range(len(LIGHT)):
        c = LIGHT[(first + k) % len(LIGHT)]
        if c != background and math.dist(COLORS[c], COLORS[background]) >= MIN_CONTRAST:
            return c
    raise ValueError(f"no light colour shows on {background!r}")  # not with COLORS as they are


def visible_outline(background: str, outline: str) -> str:
    """`outline`, or the first outline of its width (in OUTLINES' order) whose colour shows on `background`; as
    `visible_pattern_color`, without drawing from the rng."""
    if outline == "no":
        return outline
    for o in (outline, *OUTLINES):
        if (o != "no" and OUTLINE_WIDTH[o] == OUTLINE_WIDTH[outline]
                and math.dist(OUTLINE_RGB[o], COLORS[background]) >= MIN_CONTRAST):
            return o
    raise ValueError(f"no {outline!r}-wide outline shows on {background!r}")  # not with COLORS as they are


def sample_content(rng: np.random.Generator) -> Content:
    count = int(rng.integers(1, 3))
    positions = SINGLE_POSITIONS if count == 1 else PAIR_POSITIONS
    return Content(shape=SHAPES[rng.integers(len(SHAPES))], count=count, size=SIZES[rng.integers(2)],
                   position=positions[rng.integers(len(positions))])


def _centers(content: Content) -> list[tuple[float, float]]:
    """Shape centres in unit coordinates (x right, y down)."""
    single = {"in the center": (0.5, 0.5), "at the top left": (0.27, 0.27), "at the top right": (0.73, 0.27),
              "at the bottom left": (0.27, 0.73), "at the bottom right": (0.73, 0.73)}
    if content.count == 1:
        return [single[content.position]]
    y = {"at the top": 0.27, "in the middle": 0.5, "at the bottom": 0.73}[content.position]
    return [(0.27, y), (0.73, y)]


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        # apex up; base at cy + 0.8r
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        w = r * 0.35
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(style: ToyStyle, content: Content, size: int, rng: np.random.Generator,
           pattern_offset: bool = True) -> Image.Image:
    """Draw one image: supersampled 4x, then box-downsampled so edges are anti-aliased. With `pattern_offset` the
    background pattern is shifted by an offset drawn from `rng` (uniform over one period in x and y)."""
    s = size * 4
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s  # unit coordinates
    col = {k: np.array(v, np.float32) for k, v in COLORS.items()}
    period = {"wide": 0.25, "fine": 0.125}[style.frequency]
    # the pattern's coordinates: a style is its pattern's kind, colour and period, not where its dots fall
    px, py = (x, y) if not pattern_offset else (x + np.float32(rng.uniform(0, period)),
                                                 y + np.float32(rng.uniform(0, period)))
    if style.pattern == "horizontal stripes":
        pat = (py % period) < period / 2
    elif style.pattern == "vertical stripes":
        pat = (px % period) < period / 2
    elif style.pattern == "diagonal stripes":
        u = (px + py) if style.angle == 135 else (px - py + 1.0)
        pat = (u % period) < period / 2
    elif style.pattern == "checkerboard":
        pat = ((px // (period / 2) + py // (period / 2)) % 2) == 0
    elif style.pattern == "polka dots":
        pat = ((px % period - period / 2) ** 2 + (py % period - period / 2) ** 2) <= (period * 0.28) ** 2
    elif style.pattern == "grid lines":
        pat = ((px % period) < period * 0.18) | ((py % period) < period * 0.18)
    else:
        pat = np.zeros_like(px, dtype=bool)
    img = np.where(pat[..., None], col[style.pattern_color], col[style.background])

    r = {"small": 0.13, "large": 0.21}[content.size]
    width = OUTLINE_WIDTH[style.outline]
    ocol = np.array(OUTLINE_RGB.get(style.outline, (0, 0, 0)), np.float32)
    for cx, cy in _centers(content):
        if width:
            outer = _shape_mask(content.shape, x, y, cx, cy, r + width)
            img[outer] = ocol
        img[_shape_mask(content.shape, x, y, cx, cy, r)] = col[style.foreground]

    img = img.reshape(size, 4, size, 4, 3).mean(axis=(1, 3))  # (size, size, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if style.finish == "grainy":
        img = img + rng.normal(0, 14, img.shape)
    elif style.finish == "vignette":
        d = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
        img = img * (1.0 - 0.9 * np.clip(d - 0.25, 0, None))[..., None]
    elif style.finish == "glossy gradient":
        img = img + (60 * (0.5 - yy))[..., None]
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)  # PIL writes no timestamp: deterministic bytes
    return buf.getvalue()


MEGASTYLE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("content", pa.string()),
    ("style", pa.string()),
])


def generate_styles(cfg: ToyWorldConfig) -> list[ToyStyle]:
    """`cfg.styles` distinct styles, deterministic from the seed."""
    rng = np.random.default_rng(cfg.seed)
    styles, seen = [], set()
    while len(styles) < cfg.styles:
        st = sample_style(rng)
        if st.look() not in seen:
            seen.add(st.look())
            styles.append(st)
    return styles


def generate_rows(cfg: ToyWorldConfig, start: int = 0, stop: int | None = None):
    """Yield MegaStyle rows `start` .. `stop` - 1 (all by default), style by style (8 consecutive rows per style),
    with their ToyStyle. Each style draws from its own seed: a row is the same whatever range it is yielded in."""
    styles = generate_styles(cfg)
    stop = len(styles) * ROWS_PER_STYLE if stop is None else stop
    for si in range(start // ROWS_PER_STYLE, -(-stop // ROWS_PER_STYLE)):
        style, rng = styles[si], np.random.default_rng([cfg.seed, si])
        contents, seen = [], set()
        while len(contents) < ROWS_PER_STYLE:
            c = sample_content(rng)
            if c not in seen:  # different contents within a style, as MegaStyle's tuples need
                seen.add(c)
                contents.append(c)
        for ci, content in enumerate(contents):
            image = render(style, content, cfg.size, rng, cfg.pattern_offset)  # even if not yielded: it advances the rng
            if start <= si * ROWS_PER_STYLE + ci < stop:
                rid = f"s{si:06d}_c{ci:02d}"
                yield {"id": rid, "image": {"bytes": png_bytes(image), "path": f"images/{rid}.png"},
                       "content": content.describe(), "style": style.describe()}, style


_SHARD_NAME = re.compile(r"train-\d{5,}-of-\d{5,}\.parquet(\.tmp)?")  # as `write_toyworld` names its shards


def write_toyworld(cfg: ToyWorldConfig, out_dir: str | os.PathLike, progress: bool = True,
                   writers: int | None = None) -> dict:
    """Write parquet shards + metadata.csv under `out_dir`, which then holds exactly this world: the toy world's
    shards of an earlier write there are removed. Returns a summary.

    writers: processes that write the shards, each a block of them (None: one per core, for a world of at least
    ROWS_PER_WRITER rows each). This one writes the first block; the others run in children of their own (not
    multiprocessing's spawn, which re-runs a caller's script). Every writer's shards are the bytes one writer writes."""
    from i2l.cluster.child import start_in_child

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total, n_shards = _rows_and_shards(cfg)
    if writers is None:
        writers = min(os.cpu_count() or 1, total // ROWS_PER_WRITER)
    writers = max(1, min(writers, n_shards))
    blocks = [(n_shards * k // writers, n_shards * (k + 1) // writers) for k in range(writers)]
    others = []
    try:
        others = [start_in_child("i2l.toy.world:write_shards", cfg, str(out), *b, progress=False) for b in blocks[1:]]
        written = write_shards(cfg, out, *blocks[0], progress=progress)
        for child in others:
            written += child.result()
    finally:
        for child in others:
            child.terminate()  # done already, or this writer failed: the others stop too
    tmp = atomic_tmp(out / "metadata.csv")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["style_id", *(f.name for f in fields(ToyStyle)), "brushwork", "light"])
        for si, st in enumerate(generate_styles(cfg)):
            sid = f"s{si:06d}"
            # MegaStyle's metadata has attributes the toy world lacks: they read N/A, as there.
            w.writerow([sid, *asdict(st).values(), "N/A", "N/A"])
    replace_durably(tmp, out / "metadata.csv")
    # Readers take every *.parquet in the folder: shards of an earlier world of another shard count must go, or
    # they would be read along with this one. Only files of the toy world's own naming are removed.
    for p in out.iterdir():
        if _SHARD_NAME.fullmatch(p.name) and p.name not in written:
            p.unlink()
    return {"dir": str(out), "rows": total, "styles": cfg.styles, "shards": written, "writers": writers}


def write_shards(cfg: ToyWorldConfig, out_dir: str | os.PathLike, first: int, stop: int,
                 progress: bool = True) -> list[str]:
    """Write shards `first` .. `stop` - 1 of the toy world (shard k: rows k·R .. (k+1)·R - 1, R = rows_per_shard);
    returns their file names."""
    from tqdm import tqdm

    out, per = Path(out_dir), cfg.rows_per_shard
    total, n_shards = _rows_and_shards(cfg)
    start, end = first * per, min(stop * per, total)
    rows, written = [], []
    bar = tqdm(generate_rows(cfg, start, end), total=end - start, desc="toyworld", unit="img", disable=not progress)
    for n, (row, _) in enumerate(bar, start=start + 1):  # n: rows of the world up to this one
        rows.append(row)
        if len(rows) == per or n == end:
            path = out / f"train-{first + len(written):05d}-of-{n_shards:05d}.parquet"
            with atomic_path(path) as tmp:  # a reader never sees half a shard
                pq.write_table(pa.Table.from_pylist(rows, schema=MEGASTYLE_SCHEMA), tmp, compression="zstd")
            written.append(path.name)
            rows = []
    return written


def _rows_and_shards(cfg: ToyWorldConfig) -> tuple[int, int]:
    total = cfg.styles * ROWS_PER_STYLE
    return total, -(-total // cfg.rows_per_shard)
