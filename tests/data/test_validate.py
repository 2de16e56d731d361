"""Decoding and validation of MegaStyle rows: every kind of bad image is converted correctly or refused with
its reason, and nothing outside the input directory is ever opened (no Ray here; see test_data_prepare)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from bad_data import (
    _rgb,
    bomb,
    check_converted,
    encode,
    palette_transparent,
    png16_rgb,
    read_split_images,
    rgba_half,
    write_bad_dataset,
)
from PIL import Image

from i2l.config import get_config
from i2l.data.megastyle import QUARANTINE_SCHEMA, find_shards, style_id_of
from i2l.data.plan import make_plan
from i2l.data.units import process_unit
from i2l.data.upscale import LanczosUpscaler
from i2l.data.validate import REASONS, Rejected, decode_image, validate_row

CFG = get_config("debug").data  # max_pixels 4096^2, min_side 16, max_aspect 2


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
