"""A MegaStyle-layout dataset with bad rows mixed in, and checks of what `prepare` wrote from it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from i2l.config import get_config
from i2l.data.validate import decode_image
from i2l.toy.world import MEGASTYLE_SCHEMA, generate_rows

CFG = get_config("debug").data  # max_pixels 4096^2, min_side 16, max_aspect 2


# ---- image builders -------------------------------------------------------------------------------------------
def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16_rgb(value: tuple[int, int, int], size: int = 32) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), built chunk by chunk."""
    row = b"\x00" + struct.pack(">HHH", *value) * size  # filter byte 0 + big-endian samples
    ihdr = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * size))
            + _chunk(b"IEND", b""))


def bomb(width: int, height: int) -> bytes:
    """A valid little PNG whose header claims width x height: what a decompression bomb looks like up front."""
    data = bytearray(encode(Image.new("1", (8, 8))))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def rgba_half() -> bytes:
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 255)  # opaque red | fully transparent blue
    a[:, 16:] = (0, 0, 255, 0)
    return encode(Image.fromarray(a, "RGBA"))


def palette_transparent() -> bytes:
    im = Image.new("P", (32, 32), 1)
    im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    im.paste(0, (0, 0, 16, 32))
    return encode(im, transparency=0)  # index 0 (left half) is transparent


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, CFG.max_pixels), dtype=np.int32)


# ---- a MegaStyle directory full of bad rows (shared with test_data_prepare) ----------------------------------
def write_bad_dataset(root: Path) -> tuple[Path, dict[str, bytes], list[tuple[str, str]]]:
    """4 toy styles with bad rows mixed in, over 2 shards of 5-row row groups.

    Returns (input dir, {id: input image bytes} of the rows that must be written, sorted [(id, reason)] of
    the rows that must be quarantined). Hostile `path` values point at real files outside the input
    directory: they must never be opened.
    """
    inp = root / "a" / "b" / "in"
    inp.mkdir(parents=True)
    (root / "a" / "secret.png").write_bytes(encode(Image.new("RGB", (32, 32), (255, 0, 255))))  # in/../../
    tw = get_config("debug").toyworld
    tw.styles = 4
    rows = [dict(r) for r, _ in generate_rows(tw)]
    bad = {  # row position -> (field, value, reason or None if it must be converted)
        1: ("image", encode(Image.effect_noise((64, 64), 50))[:400], "decode_error"),
        2: ("image", b"", "missing_image"),
        3: ("image", b"GIF89a but not really" * 3, "not_an_image"),
        4: ("image", bomb(5000, 5000), "decompression_bomb"),
        5: ("image", encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), None),
        6: ("image", rgba_half(), None),
        9: ("image", encode(Image.fromarray(np.full((32, 32), 128 * 257, np.uint16))), None),
        10: ("image", encode(Image.new("L", (32, 32), 77)), None),
        11: ("content", None, "missing_content"),
        12: ("content", "", "missing_content"),
        13: ("style", None, "missing_style"),
        14: ("style", "  ", "missing_style"),
        17: ("image", encode(Image.new("RGB", (8, 8))), "too_small"),
        18: ("path", "../../secret.png", None),
        19: ("path", "/etc/passwd", None),
        20: ("image", png16_rgb((65535, 128 * 257, 0)), None),
    }
    rejects = [("s000000_c07", "duplicate_id"), ("../../etc/passwd", "bad_id")]
    for i, (fld, value, reason) in bad.items():
        if fld in ("image", "path"):
            img = dict(rows[i]["image"])
            img["bytes" if fld == "image" else "path"] = value
            rows[i]["image"] = img
        else:
            rows[i][fld] = value
        if reason:
            rejects.append((rows[i]["id"], reason))
    # a duplicate id (a different image) right after its style, and a hostile id
    dup = dict(rows[7], image={"bytes": encode(Image.new("RGB", (32, 32), (0, 0, 0))), "path": "x.png"})
    hostile = dict(rows[0], id="../../etc/passwd")
    bad_ids = {r for r, _ in rejects if r not in ("s000000_c07",)}
    kept = {r["id"]: r["image"]["bytes"] for r in rows if r["id"] not in bad_ids}
    rows = rows[:8] + [dup] + rows[8:16] + [hostile] + rows[16:]
    for k, part in enumerate((rows[:13], rows[13:])):  # style 1 straddles the two input shards
        pq.write_table(pa.Table.from_pylist(part, schema=MEGASTYLE_SCHEMA), inp / f"train-{k:05d}-of-00002.parquet",
                       row_group_size=5)
    return inp, kept, sorted(rejects)


def check_converted(written: dict[str, bytes], kept: dict[str, bytes]) -> None:
    """Every kept row is written once, its pixels = the input's converted to RGB (debug keeps 32x32)."""
    assert set(written) == set(kept)
    for rid, data in written.items():
        assert _rgb(data).tolist() == _rgb(kept[rid]).tolist(), rid


def read_split_images(out: Path) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    for f in sorted(out.glob("*/part-*.parquet")):
        t = pq.read_table(f, columns=["id", "image"])
        for rid, data in zip(t.column("id").to_pylist(), t.column("image").to_pylist()):
            assert rid not in got, f"{rid} written twice"
            got[rid] = data
    return got
