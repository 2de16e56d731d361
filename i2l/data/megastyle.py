"""The MegaStyle layout: find the published parquet shards and stream them row group by row group; the
schema, streaming writer and reader of the prepared (training-ready) shards."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from i2l.io import atomic_path, atomic_tmp, file_sha256, naming_disk_full, replace_durably

# `s{style}_c{content}`; anything else (a path, an empty string, 10 kB of junk) is a bad id.
ID_RE = re.compile(r"(s[0-9A-Za-z]{1,32})_c[0-9A-Za-z]{1,32}")  # used with fullmatch: no "\n" tail
INPUT_COLUMNS = ("id", "image", "content", "style")
SPLITS = ("train", "val")

PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("style_id", pa.string()),  # the `s{style}` prefix of id
    ("content", pa.string()),
    ("style", pa.string()),
    ("image", pa.binary()),  # encoded bytes (png | jpeg | webp)
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("sha256", pa.string()),  # of the image bytes
    ("split", pa.string()),  # train | val
    ("source_file", pa.string()),  # input shard, relative to the input directory
])
QUARANTINE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_file", pa.string()),
    ("row_index", pa.int64()),  # row within source_file
    ("reason", pa.string()),
    ("detail", pa.string()),
])


def style_id_of(row_id: object) -> str | None:
    """`s000012_c03` -> `s000012`; None for anything that is not a MegaStyle id."""
    m = ID_RE.fullmatch(row_id) if isinstance(row_id, str) else None
    return m.group(1) if m else None


@dataclass(frozen=True)
class InputShard:
    """One published parquet file: where it is, how big, and how its rows split into row groups."""

    path: str  # relative to the input directory, posix
    rows: int
    bytes: int
    mtime_ns: int
    row_groups: tuple[int, ...]  # rows per row group

    def to_dict(self) -> dict:
        return {"file": self.path, "rows": self.rows, "bytes": self.bytes,
                "fingerprint": f"{self.bytes}:{self.mtime_ns}"}


def _check_schema(schema: pa.Schema, rel: str) -> None:
    missing = [c for c in INPUT_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{rel} is not a MegaStyle shard: missing column(s) {', '.join(missing)} "
                         f"(expected {', '.join(INPUT_COLUMNS)}); point --input at the dataset's directory")
    t = schema.field("image").type
    ok = (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0) or pa.types.is_binary(t) \
        or pa.types.is_large_binary(t)
    if not ok:
        raise ValueError(f"{rel}: column image must be struct{{bytes, path}} or binary, not {t}")


def find_shards(input_dir: str | os.PathLike) -> list[InputShard]:
    """All `*.parquet` files under input_dir (hidden folders skipped), in sorted order, schema-checked.

    Reads only parquet footers. A file that resolves outside input_dir (a symlink) is refused, so nothing
    outside the input directory is ever read.
    """
    root = Path(input_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"input directory not found: {input_dir}")
    shards = []
    for p in sorted(root.rglob("*.parquet")):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if not p.resolve().is_relative_to(root):
            raise ValueError(f"{rel} links outside the input directory {root}; copy the file in instead")
        meta = pq.read_metadata(p)
        _check_schema(meta.schema.to_arrow_schema(), rel)
        st = p.stat()
        shards.append(InputShard(rel, meta.num_rows, st.st_size, st.st_mtime_ns,
                                 tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))))
    if not shards:
        raise FileNotFoundError(f"no .parquet shards under {input_dir}: expected the MegaStyle layout "
                                "(write a toy one with `i2l toyworld`)")
    return shards


def read_metadata(input_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The optional metadata.csv: style_id -> attributes ('N/A' kept as is). {} when absent."""
    import csv

    path = Path(input_dir) / "metadata.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["style_id"]: r for r in csv.DictReader(f) if r.get("style_id")}


def image_bytes(table: pa.Table) -> list[bytes | None]:
    """The encoded image bytes of each row, whatever the layout (struct{bytes, path} or plain binary)."""
    col = table.column("image")
    if pa.types.is_struct(col.type):
        col = pc.struct_field(col, "bytes")  # `path` is metadata only: never read, never opened
    return col.to_pylist()


class RowRangeReader:
    """Read row ranges of input shards, one row group in memory at a time."""

    def __init__(self, input_dir: str | os.PathLike, columns=INPUT_COLUMNS):
        self.root = Path(input_dir)
        self.columns = list(columns)
        self._file: tuple[str, pq.ParquetFile] | None = None
        self._group: tuple[str, int, pa.Table] | None = None  # last row group read

    def _row_group(self, shard: InputShard, index: int) -> pa.Table:
        if self._group and self._group[:2] == (shard.path, index):
            return self._group[2]
        if not self._file or self._file[0] != shard.path:
            self._file = (shard.path, pq.ParquetFile(self.root / shard.path))
        table = self._file[1].read_row_group(index, columns=self.columns)
        self._group = (shard.path, index, table)
        return table

    def read(self, shard: InputShard, start: int, stop: int) -> Iterator[tuple[int, pa.Table]]:
        """Yield (first row index, table) slices covering rows [start, stop) of the shard."""
        offset = 0
        for g, n in enumerate(shard.row_groups):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                yield lo, self._row_group(shard, g).slice(lo - offset, hi - lo)
            offset += n
            if offset >= stop:
                break








def encode_image(im, fmt: str, quality: int) -> bytes:
    """An RGB image -> the bytes stored in a prepared shard (png, or jpeg/webp at `quality`)."""
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG")
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: keep colour detail
    else:
        im.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()




class ShardWriter:
    """Stream rows into one prepared shard: row groups of `row_group_rows`, zstd, atomic rename on close."""

    def __init__(self, path: Path, split: str, row_group_rows: int, schema: pa.Schema = PREPARED_SCHEMA):
        self.path, self.split, self.row_group_rows, self.schema = path, split, row_group_rows, schema
        self.tmp = atomic_tmp(path)
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[dict] = []
        self.rows = 0
        self.styles: set[str] = set()

    def write(self, row: dict) -> None:
        self._buffer.append(row)
        self.rows += 1
        if "style_id" in row:
            self.styles.add(row["style_id"])
        if len(self._buffer) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        with naming_disk_full(self.path):  # ENOSPC: a DiskFullError naming the shard (abort removes the tmp)
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema),
                                     row_group_size=self.row_group_rows)
        self._buffer = []

    def close(self) -> dict | None:
        """Finish the file and rename it into place; None when no row was written (no file)."""
        self._flush()
        if self._writer is None:
            return None
        with naming_disk_full(self.path):
            self._writer.close()
            replace_durably(self.tmp, self.path)  # atomic: readers never see half a shard
        return {"name": f"{self.split}/{self.path.name}" if self.split in SPLITS else self.path.name,
                "split": self.split, "rows": self.rows, "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "styles": len(self.styles)}

    def abort(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError, ValueError):  # a full disk fails the close too: the tmp goes anyway
                writer.close()
        self.tmp.unlink(missing_ok=True)


def write_quarantine(path: Path, rows: list[dict], pieces: list[Path], progress: bool = False) -> Counter:
    """quarantine.parquet = `rows` + the pieces' rows, streamed piece by piece; returns counts by reason."""
    from tqdm import tqdm

    by_reason = Counter(r["reason"] for r in rows)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, QUARANTINE_SCHEMA, compression="zstd") as w:
        w.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))
        for piece in tqdm(pieces, desc="quarantine", unit="piece", disable=not progress):
            table = pq.read_table(piece, schema=QUARANTINE_SCHEMA)
            by_reason.update(table.column("reason").to_pylist())
            w.write_table(table)
    return by_reason
