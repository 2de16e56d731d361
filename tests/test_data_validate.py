"""Decoding and validation of MegaStyle rows: every kind of bad image is converted correctly or refused with
its reason, and nothing outside the input directory is ever opened (no Ray here; see test_data_prepare)."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from i2l.config import get_config
from i2l.data.megastyle import QUARANTINE_SCHEMA, find_shards, style_id_of
from i2l.data.prepare import make_plan, process_unit
from i2l.data.upscale import LanczosUpscaler
from i2l.data.validate import REASONS, Rejected, decode_image, validate_row
from i2l.toyworld import MEGASTYLE_SCHEMA, generate_rows

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


# (name, bytes, expected reason | None, check of the converted RGB array)
GOOD = np.asarray(Image.new("RGB", (32, 32), (10, 20, 30)))
CASES = [
    ("rgb", lambda: encode(Image.fromarray(GOOD)), None, lambda a: (a == GOOD).all()),
    ("grayscale", lambda: encode(Image.new("L", (32, 32), 77)), None, lambda a: (a == 77).all()),
    ("bilevel", lambda: encode(Image.new("1", (32, 32), 1)), None, lambda a: (a == 255).all()),
    ("gray16", lambda: encode(Image.fromarray(np.full((32, 32), 128 * 257, np.uint16))), None,
     lambda a: (a == 128).all()),  # PIL's own convert would clip this to 255
    ("rgb16", lambda: png16_rgb((65535, 128 * 257, 0)), None, lambda a: (a == (255, 128, 0)).all()),
    ("rgba", rgba_half, None, lambda a: (a[:, :16] == (255, 0, 0)).all() and (a[:, 16:] == 255).all()),
    ("palette_alpha", palette_transparent, None,
     lambda a: (a[:, :16] == 255).all() and (a[:, 16:] == (0, 200, 0)).all()),
    ("cmyk_jpeg", lambda: encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), None,
     lambda a: (np.abs(a - (255, 0, 0)) <= 3).all()),
    ("webp", lambda: encode(Image.fromarray(GOOD), "WEBP", lossless=True), None, lambda a: (a == GOOD).all()),
    ("truncated_png", lambda: encode(Image.effect_noise((64, 64), 50))[:400], "decode_error", None),
    ("zero_bytes", lambda: b"", "missing_image", None),
    ("null_bytes", lambda: None, "missing_image", None),
    ("not_image", lambda: b"this is not an image, just some text bytes" * 4, "not_an_image", None),
    ("ppm_refused", lambda: encode(Image.fromarray(GOOD), "PPM"), "not_an_image", None),
    ("bomb_over_limit", lambda: bomb(5000, 5000), "decompression_bomb", None),  # 25 M px > 16.7 M limit
    ("bomb_over_pil_limit", lambda: bomb(30000, 30000), "decompression_bomb", None),  # PIL itself refuses
]


@pytest.mark.parametrize("name,make,reason,check", CASES, ids=[c[0] for c in CASES])
def test_decode_converts_or_rejects(name, make, reason, check):
    data = make()
    if reason:
        with pytest.raises(Rejected) as e:
            decode_image(data, CFG.max_pixels)
        assert e.value.reason == reason and e.value.reason in REASONS
    else:
        a = _rgb(data)
        assert a.shape == (32, 32, 3) and check(a), (name, a[0, 0], a[0, -1])


@pytest.mark.parametrize("size,reason", [((8, 8), "too_small"), ((64, 24), "bad_aspect"), ((48, 32), None)])
def test_geometry(size, reason):
    data = encode(Image.new("RGB", size))
    if reason:
        with pytest.raises(Rejected, match=reason):
            validate_row(data, "one circle", "In the style of x", CFG)
    else:
        assert validate_row(data, "one circle", "In the style of x", CFG).image.size == size


@pytest.mark.parametrize("content,style,reason", [
    (None, "In the style of x", "missing_content"), ("   ", "In the style of x", "missing_content"),
    ("ab", "In the style of x", "bad_content"), ("x" * 2001, "In the style of x", "bad_content"),
    ("one\x00circle", "In the style of x", "bad_content"), ("one circle", None, "missing_style"),
    ("one circle", "", "missing_style"), ("one circle", "ok", "bad_style"), (" one circle\n", "  style  ", None),
])
def test_text_checks(content, style, reason):
    data = encode(Image.new("RGB", (32, 32)))
    if reason:
        with pytest.raises(Rejected) as e:
            validate_row(data, content, style, CFG)
        assert e.value.reason == reason
    else:
        row = validate_row(data, content, style, CFG)
        assert (row.content, row.style) == ("one circle", "style")  # stripped


def test_ids():
    assert style_id_of("s000012_c03") == "s000012"
    for bad in ("../../etc/passwd", "", None, 12, "s1_c2/../x", "s_c1", "s1_c2\n", "x" * 300):
        assert style_id_of(bad) is None


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


def run_units_in_process(cfg, inp: Path, out: Path):
    """The worker code path of prepare, without Ray: plan, then every unit in this process."""
    plan = make_plan(inp, cfg, progress=False)
    up = LanczosUpscaler(cfg.resolution)
    return plan, [process_unit(u, plan.shards, inp, out, cfg, up, plan.fingerprint) for u in plan.units]


_AUDIT = {"on": False, "opened": []}


def _audit(event, args):
    if _AUDIT["on"] and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _AUDIT["opened"].append(args[0].decode() if isinstance(args[0], bytes) else str(args[0]))


def test_nothing_read_outside_input_dir(tmp_path):
    inp, kept, rejects = write_bad_dataset(tmp_path)
    out = tmp_path / "out"
    if not getattr(sys, "_i2l_data_audit", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: this one records only while the flag is on
        sys._i2l_data_audit = True
    _AUDIT.update(on=True, opened=[])
    try:
        plan, records = run_units_in_process(CFG, inp, out)
    finally:
        _AUDIT["on"] = False
    opened = {Path(p).resolve() for p in _AUDIT["opened"]}
    assert any(p.suffix == ".parquet" for p in opened), "the audit hook saw no read: it would pass vacuously"
    inside = [p for p in opened if p.is_relative_to(tmp_path.resolve())]
    assert all(p.is_relative_to(inp.resolve()) or p.is_relative_to(out.resolve()) for p in inside), inside
    assert Path("/etc/passwd") not in opened and (tmp_path / "a" / "secret.png").resolve() not in opened
    check_converted(read_split_images(out), kept)  # hostile-path rows converted from their bytes
    quarantined = list(plan.rejects)
    for f in (out / ".work" / "quarantine").glob("*.parquet"):
        quarantined += pq.read_table(f, schema=QUARANTINE_SCHEMA).to_pylist()
    assert sorted((r["id"], r["reason"]) for r in quarantined) == rejects
    assert all(r["source_file"].startswith("train-0000") and r["detail"] for r in quarantined)
    rows_in = sum(s.rows for s in find_shards(inp))
    assert rows_in == sum(r["rows_in"] for r in records) + len(plan.rejects)
    assert rows_in == len(kept) + len(rejects)
