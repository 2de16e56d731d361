"""Out-of-family styles: a second procedural style generator whose styles the toy world (i2l/toy/world.py) never
draws — other textures (value noise, gradients, concentric rings, hatching, waves, bricks), other palettes (dark
grounds with light or neon figures, earth and pastel schemes, colours outside the toy world's 16), other figure
treatments (hollow, glowing, textured fills). Same contents (shape, count, size, position) and the same MegaStyle
parquet layout as the toy world, so the data code reads it; it is never part of a training set: evaluation writes
it next to its own outputs and asks whether i2L's LoRAs move samples toward styles it has never seen.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from i2l.io import atomic_path
from i2l.toy.world import (
    MEGASTYLE_SCHEMA,
    ROWS_PER_STYLE,
    Content,
    _centers,
    _shape_mask,
    png_bytes,
    sample_content,
)

# None of these is a toy-world colour (COLORS): the test checks it.
FOREIGN_COLORS = {
    "midnight": (12, 16, 38), "forest night": (10, 40, 28), "espresso": (45, 28, 20), "ink": (22, 22, 30),
    "neon magenta": (255, 0, 200), "neon cyan": (0, 235, 255), "acid green": (185, 255, 0), "hot orange": (255, 90, 0),
    "olive": (110, 120, 40), "rust": (170, 70, 30), "sand": (215, 190, 140), "slate": (90, 105, 120),
    "mint": (170, 240, 205), "lavender": (200, 180, 245), "peach": (255, 200, 170), "butter": (255, 240, 160),
}
# name -> (ground colours, figure colours, texture colours): each scheme's own roles
SCHEMES = {
    "neon on dark": (("midnight", "ink"), ("neon magenta", "neon cyan", "acid green", "hot orange"),
                     ("slate", "forest night")),
    "earth": (("sand",), ("espresso", "rust", "olive"), ("peach", "butter")),
    "pastel on dark": (("espresso", "forest night"), ("mint", "lavender", "peach", "butter"), ("olive", "slate")),
    "rust and slate": (("slate",), ("butter", "sand"), ("rust", "ink")),
}
TEXTURES = ("value noise", "linear gradient", "radial gradient", "concentric rings", "cross hatching",
            "wavy stripes", "bricks")
TREATMENTS = ("hollow", "glowing", "textured")


@dataclass(frozen=True)
class ForeignStyle:
    scheme: str
    ground: str
    figure: str
    texture_color: str
    texture: str
    scale: int  # texture repeats across the image
    treatment: str

    def describe(self) -> str:
        return (f"In the style of a {self.scheme} piece: a {self.ground} ground with {self.texture_color} "
                f"{self.texture}, {self.treatment} {self.figure} shapes.")


def generate_foreign_styles(n: int, seed: int = 0) -> list[ForeignStyle]:
    """`n` distinct foreign styles, deterministic from the seed; consecutive ones cycle through the schemes and
    textures, so even 8 styles span most of them."""
    rng = np.random.default_rng([seed, 7919])
    out, seen = [], set()
    names = list(SCHEMES)
    while len(out) < n:
        i = len(out)
        scheme = names[i % len(names)]
        grounds, figures, textures = SCHEMES[scheme]
        st = ForeignStyle(scheme, grounds[rng.integers(len(grounds))], figures[rng.integers(len(figures))],
                          textures[rng.integers(len(textures))], TEXTURES[(i + rng.integers(2)) % len(TEXTURES)],
                          int(rng.choice([2, 3, 5])), TREATMENTS[(i + i // len(names)) % len(TREATMENTS)])
        if st not in seen:
            seen.add(st)
            out.append(st)
    return out


def _value_noise(x: np.ndarray, y: np.ndarray, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a (scale+1)² random lattice, bilinearly interpolated with a smoothstep."""
    lat = rng.random((scale + 2, scale + 2))
    gx, gy = x * scale, y * scale
    i, j = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - i, gy - j
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    top = lat[j, i] * (1 - sx) + lat[j, i + 1] * sx
    bottom = lat[j + 1, i] * (1 - sx) + lat[j + 1, i + 1] * sx
    return top * (1 - sy) + bottom * sy


def _texture(style: ForeignStyle, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The texture's weight in [0, 1] at each point (0 = ground, 1 = texture colour)."""
    k = style.scale
    if style.texture == "value noise":
        return _value_noise(x, y, k + 2, rng)
    if style.texture == "linear gradient":
        return np.clip(0.5 * (x + y), 0, 1)
    if style.texture == "radial gradient":
        return np.clip(1.6 * np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2), 0, 1)
    if style.texture == "concentric rings":
        return (np.sqrt((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2 * k % 1.0 < 0.5).astype(np.float32)
    if style.texture == "cross hatching":
        p = 1.0 / (2 * k + 2)
        return ((((x + y) % p) < p * 0.25) | (((x - y) % p) < p * 0.25)).astype(np.float32)
    if style.texture == "wavy stripes":
        return (np.sin(2 * np.pi * (k * y + 0.15 * np.sin(2 * np.pi * 2 * x))) > 0).astype(np.float32)
    if style.texture == "bricks":
        h = 1.0 / (2 * k)
        row = np.floor(y / h)
        xs = x + (row % 2) * h
        return (((y % h) < h * 0.15) | ((xs % (2 * h)) < h * 0.15)).astype(np.float32)
    raise ValueError(f"unknown texture {style.texture!r}")


def render_foreign(style: ForeignStyle, content: Content, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of a foreign style (supersampled 4x, box-downsampled, as the toy world draws)."""
    s = size * 4
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) / s
    col = {k: np.array(v, np.float32) for k, v in FOREIGN_COLORS.items()}
    w = _texture(style, x, y, rng)[..., None]
    img = col[style.ground] * (1 - w) + col[style.texture_color] * w
    r = {"small": 0.13, "large": 0.21}[content.size]
    for cx, cy in _centers(content):
        inner = _shape_mask(content.shape, x, y, cx, cy, r)
        if style.treatment == "hollow":
            ring = _shape_mask(content.shape, x, y, cx, cy, r) & ~_shape_mask(content.shape, x, y, cx, cy, r * 0.6)
            img[ring] = col[style.figure]
        elif style.treatment == "glowing":
            halo = _shape_mask(content.shape, x, y, cx, cy, r * 1.45) & ~inner
            img[halo] = 0.55 * img[halo] + 0.45 * col[style.figure]
            img[inner] = col[style.figure]
        else:  # textured: the figure carries the texture, inverted
            img[inner] = col[style.figure] * (1 - 0.6 * w[inner]) + col[style.ground] * 0.6 * w[inner]
    img = img.reshape(size, 4, size, 4, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def write_foreign_world(styles: int, out_dir: str | os.PathLike, size: int = 32, seed: int = 0) -> dict:
    """Write `styles` foreign styles x 8 contents as one MegaStyle-layout shard (ids f<style>_c<content>, so
    never a toy-world id) + metadata.csv under out_dir. -> {dir, rows, styles, shard}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, meta = [], []
    for si, style in enumerate(generate_foreign_styles(styles, seed)):
        rng = np.random.default_rng([seed, 104729, si])
        contents, seen = [], set()
        while len(contents) < ROWS_PER_STYLE:
            c = sample_content(rng)
            if c not in seen:
                seen.add(c)
                contents.append(c)
        for ci, content in enumerate(contents):
            rid = f"f{si:06d}_c{ci:02d}"
            im = render_foreign(style, content, size, rng)
            rows.append({"id": rid, "image": {"bytes": png_bytes(im), "path": f"images/{rid}.png"},
                         "content": content.describe(), "style": style.describe()})
        meta.append({"style_id": f"f{si:06d}", **asdict(style)})
    shard = out / "train-00000-of-00001.parquet"
    with atomic_path(shard) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=MEGASTYLE_SCHEMA), tmp, compression="zstd")
    with open(out / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta[0]))
        w.writeheader()
        w.writerows(meta)
    return {"dir": str(out), "rows": len(rows), "styles": styles, "shard": shard.name}

