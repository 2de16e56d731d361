"""Reading training-ready shards: a prepared directory (`<dir>/<split>/part-*.parquet`, binary `image`) or,
for quick experiments, a raw MegaStyle-layout directory (`image` struct; every row counts as `train`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from i2l.data.images import decode

PREPARED_FILES = ("quarantine.parquet",)  # what `i2l prepare` writes next to its split directories


def prepared_files(data_dir: str | Path, split: str) -> list[Path]:
    """The finished shards of one split of a prepared directory, in order; [] when it has none (unfinished
    writes are dot-prefixed .tmp files: never listed)."""
    return sorted((Path(data_dir) / split).glob("part-*.parquet"))


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The shards of one split: a prepared directory's, else (train only) a raw MegaStyle directory's."""
    d = Path(data_dir)
    files = prepared_files(d, split)
    if files:
        return files
    # A prepared directory (manifest.json) with no shards of this split is empty, not raw: its quarantine (and
    # any other parquet next to it) holds rejected rows, never training data.
    raw = [] if (d / "manifest.json").is_file() else sorted(p for p in d.glob("*.parquet") if p.name not in PREPARED_FILES)
    if raw and split == "train":
        return raw
    raise FileNotFoundError(f"no {split} shards under {d} (expected {d / split}/part-*.parquet from `i2l prepare`)")


def iter_rows(data_dir: str | Path, split: str, columns=("id", "image", "content", "style")) -> Iterator[dict]:
    """Stream rows (one row group at a time) with `style_id` derived when the shard lacks it."""
    for f in split_files(data_dir, split):
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        want = [c for c in {*columns, "id"} if c in names] + (["style_id"] if "style_id" in names else [])
        for rg in range(pf.num_row_groups):
            for row in pf.read_row_group(rg, columns=sorted(set(want))).to_pylist():
                img = row.get("image")
                if isinstance(img, dict):  # raw MegaStyle struct{bytes, path}: the path is never opened
                    row["image"] = img["bytes"]
                row.setdefault("style_id", row["id"].split("_")[0])
                yield row


def load_split(data_dir: str | Path, split: str, columns=("id", "image", "content", "style")) -> dict[str, list]:
    """Materialise one split (toy-sized data only) with images decoded to PIL under key `images`."""
    out: dict[str, list] = {}
    for row in iter_rows(data_dir, split, columns):
        for k, v in row.items():
            if k == "image":
                out.setdefault("images", []).append(decode(v))
            else:
                out.setdefault(k, []).append(v)
    return out
