import dataclasses
import hashlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from i2l.config import ToyWorldConfig
from i2l.data.images import decode
from i2l.toy.world import MEGASTYLE_SCHEMA, ROWS_PER_STYLE, write_toyworld


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = ToyWorldConfig(styles=6, seed=3, size=32, rows_per_shard=20)
    d = tmp_path_factory.mktemp("tw")
    write_toyworld(cfg, d, progress=False)
    return cfg, d


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    cfg, d = world
    write_toyworld(cfg, tmp_path / "again", progress=False)
    assert _digest(d) == _digest(tmp_path / "again")
    other = ToyWorldConfig(styles=6, seed=4, size=32, rows_per_shard=20)
    write_toyworld(other, tmp_path / "other", progress=False)
    assert _digest(d) != _digest(tmp_path / "other")


@pytest.mark.parametrize("writers", [2, 3])
def test_several_writer_processes_write_the_bytes_of_one(world, tmp_path, writers):
    """Shards split into blocks, each written by a process of its own (20 rows a shard cuts styles in two), come out
    byte for byte as one writer writes them; shards of an earlier world there go."""
    cfg, d = world
    out = tmp_path / "w"
    write_toyworld(ToyWorldConfig(styles=9, seed=3, size=32, rows_per_shard=10), out, progress=False, writers=writers)
    summary = write_toyworld(cfg, out, progress=False, writers=writers)
    assert summary["writers"] == writers and summary["shards"] == sorted(p.name for p in d.glob("*.parquet"))
    assert _digest(out) == _digest(d)


def test_megastyle_schema_and_layout(world):
    cfg, d = world
    shards = sorted(d.glob("train-*-of-*.parquet"))
    assert len(shards) == 3  # 48 rows / 20 per shard
    rows = []
    for s in shards:
        t = pq.read_table(s)
        assert t.schema.equals(MEGASTYLE_SCHEMA)
        rows += t.to_pylist()
    assert len(rows) == cfg.styles * ROWS_PER_STYLE
    styles = [r["id"].split("_")[0] for r in rows]
    # the 8 rows of a style are consecutive, and a style has one description and 8 different contents
    for i in range(0, len(rows), ROWS_PER_STYLE):
        block = rows[i:i + ROWS_PER_STYLE]
        assert len({r["id"].split("_")[0] for r in block}) == 1
        assert len({r["style"] for r in block}) == 1 and block[0]["style"].startswith("In the style of")
        assert len({r["content"] for r in block}) == ROWS_PER_STYLE
    assert len(set(styles)) == cfg.styles
    im = decode(rows[0]["image"]["bytes"])
    assert im.size == (32, 32) and im.mode == "RGB"
    assert (d / "metadata.csv").read_text().splitlines()[0].startswith("style_id,")


def test_styles_are_distinct_and_consistent(world):
    """Images of one style are closer in colour statistics than images of different styles."""
    cfg, d = world
    rows = [r for s in sorted(d.glob("*.parquet")) for r in pq.read_table(s).to_pylist()]
    feats = np.stack([np.asarray(Image.open(__import__("io").BytesIO(r["image"]["bytes"]))).reshape(-1, 3)
                      .mean(0) for r in rows])
    lab = np.repeat(np.arange(cfg.styles), ROWS_PER_STYLE)
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    same = dist[lab[:, None] == lab[None]].mean()
    diff = dist[lab[:, None] != lab[None]].mean()
    assert same < 0.5 * diff


def test_rewriting_a_folder_leaves_exactly_the_new_world(world, tmp_path):
    """Fewer shards over more: the earlier world's extra shards go (readers take every *.parquet), files of
    other names stay, and the folder is byte for byte a fresh write of the new world."""
    from i2l.data.megastyle import find_shards

    cfg, d = world
    big = ToyWorldConfig(styles=12, seed=3, size=32, rows_per_shard=20)
    out = tmp_path / "tw"
    write_toyworld(big, out, progress=False)
    assert len(list(out.glob("*.parquet"))) == 5  # 96 rows / 20
    (out / "notes.parquet").write_bytes(b"not the toy world's")
    (out / "README.txt").write_text("kept")
    write_toyworld(cfg, out, progress=False)
    assert (out / "notes.parquet").read_bytes() == b"not the toy world's"
    assert (out / "README.txt").read_text() == "kept"
    (out / "notes.parquet").unlink()
    (out / "README.txt").unlink()
    assert _digest(out) == _digest(d)  # the same bytes as a write into an empty folder
    assert sum(s.rows for s in find_shards(out)) == cfg.styles * ROWS_PER_STYLE
    assert len((out / "metadata.csv").read_text().splitlines()) == 1 + cfg.styles


def test_every_pattern_and_outline_shows_on_its_ground_and_no_other_style_moves(monkeypatch):
    """A pattern colour close to its ground (cream on white: 5-45 levels, invisible) is swapped for the next light
    colour that shows; a white outline on a white or cream ground is drawn black. The swaps draw nothing from the
    rng: the world is the rng's draws with those colours swapped (and, as before, a draw that repeats an earlier
    style's look left out)."""
    import math

    from i2l.toy import world as tw

    cfg = ToyWorldConfig(styles=3000)
    styles = tw.generate_styles(cfg)
    patterned = [s for s in styles if s.pattern != "plain"]
    assert min(math.dist(tw.COLORS[s.background], tw.COLORS[s.pattern_color]) for s in patterned) \
        >= tw.MIN_CONTRAST
    outlined = [s for s in styles if s.outline != "no"]
    assert min(math.dist(tw.COLORS[s.background], tw.OUTLINE_RGB[s.outline]) for s in outlined) >= tw.MIN_CONTRAST
    rng = np.random.default_rng(cfg.seed)
    with monkeypatch.context() as m:
        m.setattr(tw, "visible_pattern_color", lambda background, pattern_color: pattern_color)
        m.setattr(tw, "visible_outline", lambda background, outline: outline)
        drawn = [tw.sample_style(rng) for _ in range(cfg.styles + 200)]  # the colours as the rng drew them
    close = [{d.background, d.pattern_color} == {"cream", "white"} for d in drawn]
    assert sum(close) > 50 and any(c and d.pattern == "plain" for c, d in zip(close, drawn))  # ~3 %; plain kept
    faint = [d.outline == "thick white" and d.background in ("cream", "white") for d in drawn]
    assert sum(faint) > 100 and any(f and d.pattern == "plain" for f, d in zip(faint, drawn))  # ~6 %
    expected, seen, swapped = [], set(), []
    for d, c, f in zip(drawn, close, faint):
        if c and d.pattern != "plain":
            d = dataclasses.replace(d, pattern_color=tw.visible_pattern_color(d.background, d.pattern_color))
            swapped.append(d)
        if f:
            d = dataclasses.replace(d, outline="thick black")
        if d.look() not in seen:
            seen.add(d.look())
            expected.append(d)
    assert styles == expected[:cfg.styles]
    # a swapped pattern is drawn: away from the figure, its dots' pixels differ from the ground's (flat finish)
    st = dataclasses.replace(next(d for d in swapped if d.pattern == "polka dots"), finish="flat")
    img = np.asarray(tw.render(st, tw.Content("circle", 1, "small", "at the top left"), 32,
                               np.random.default_rng(0)), np.float32)
    corner = img[20:, 20:].reshape(-1, 3)  # away from the figure: ground and dots only
    assert np.ptp(corner, axis=0).max() >= 60
    # every outline on a plain ground is drawn: its ring differs from the same image without it (flat finish)
    content = tw.Content("circle", 1, "large", "in the center")
    for st in (dataclasses.replace(s, finish="flat") for s in outlined if s.pattern == "plain"):
        with_ring, without = (np.asarray(tw.render(x, content, 32, np.random.default_rng(0)), np.float32)
                              for x in (st, dataclasses.replace(st, outline="no")))
        assert np.abs(with_ring - without).max() >= 60, st


def test_each_image_draws_its_styles_pattern_at_its_own_offset():
    """A style's images share its pattern's kind, colour and period, each at an offset of its own (as a texture sits
    in a real style's images); `pattern_offset=False` draws them all at one offset, as the world before did."""
    from i2l.toy import world as tw

    base = tw.ToyStyle("white", "sky blue", "navy", "vertical stripes", "wide", 45, "no", "flat", "calm", "card")
    content = tw.Content("circle", 1, "small", "at the top left")
    rng = np.random.default_rng(0)
    for pattern in ("vertical stripes", "polka dots", "checkerboard"):
        st = dataclasses.replace(base, pattern=pattern)
        shifted = [np.asarray(tw.render(st, content, 32, rng), np.float32)[16:, 16:] for _ in range(4)]
        fixed = [np.asarray(tw.render(st, content, 32, rng, pattern_offset=False), np.float32)[16:, 16:]
                 for _ in range(2)]
        assert np.array_equal(*fixed)  # away from the figure: the same pixels
        gaps = [np.abs(a - b).max() for i, a in enumerate(shifted) for b in shifted[i + 1:]]
        assert min(gaps) > 0 and max(gaps) >= 60  # every image at its own offset, some far apart
        # the same pattern: both colours in the same shares (the window holds whole periods), so the same mean
        means = [float(a.mean()) for a in shifted + fixed]
        assert max(means) - min(means) <= 3, (pattern, means)
    # the world's switch: the same styles, other pixels
    cfg = ToyWorldConfig(styles=3, seed=1, size=32)
    rows = [r for r, _ in tw.generate_rows(cfg)]
    old = [r for r, _ in tw.generate_rows(dataclasses.replace(cfg, pattern_offset=False))]
    assert [r["style"] for r in rows] == [r["style"] for r in old]
    assert [r["image"]["bytes"] for r in rows] != [r["image"]["bytes"] for r in old]
