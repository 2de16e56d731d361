"""Out-of-family styles: the foreign generator draws none of the toy world's styles and is readable by the data
code; the evaluation draws every foreign style with the same prompts and seeds for base and i2L and computes the
style margin (0 for the base by construction, ~0 for a LoRA that does nothing); the report shows its grid."""

import dataclasses

import numpy as np
import pytest
import torch
from fixtures_store import EVAL_RUN, PIPELINE_RUN, make_fixture_store
from PIL import Image

from i2l.config import get_config
from i2l.data.shards import load_split
from i2l.eval.out_of_family import evaluate_out_of_family, margin_summary, style_margins
from i2l.model.lora import LoRA
from i2l.toy import foreign, world


def test_foreign_styles_are_none_of_the_toy_worlds(tmp_path):
    assert not set(foreign.FOREIGN_COLORS.values()) & set(world.COLORS.values())
    assert not set(foreign.TEXTURES) & set(world.PATTERNS)
    styles = foreign.generate_foreign_styles(8)
    assert len(set(styles)) == 8 and len({s.texture for s in styles}) >= 5 and len({s.scheme for s in styles}) == 4
    toy = {s.describe() for s in world.generate_styles(get_config("toy").toyworld)}
    assert not {s.describe() for s in styles} & toy
    # pixel-level: no foreign style's mean colour is within reach of any toy-world style's (32 px images)
    info = foreign.write_foreign_world(8, tmp_path / "foreign", size=32)
    rows = load_split(tmp_path / "foreign", "train")  # the data code reads the MegaStyle layout
    assert info["rows"] == len(rows["images"]) == 64 and all(i.startswith("f") for i in rows["id"])
    assert len(set(rows["style_id"])) == 8 and len(set(rows["content"][:8])) == 8
    toy_rows = load_split(_toy_world(tmp_path), "train")
    assert not set(rows["id"]) & set(toy_rows["id"])


def _toy_world(tmp_path):
    out = tmp_path / "toy"
    world.write_toyworld(dataclasses.replace(get_config("debug").toyworld, styles=4), out, progress=False)
    return out


def test_the_margin_is_own_minus_the_mean_of_the_others():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(5, 6, generator=g), dim=-1)
    cents = torch.randn(3, 6, generator=g)
    owner = torch.tensor([0, 1, 2, 2, 0])
    got = style_margins(emb, owner, cents)
    for i in range(5):
        cos = [float(emb[i] @ (c / c.norm())) for c in cents]
        own = cos[int(owner[i])]
        want = own - (sum(cos) - own) / 2
        assert abs(float(got[i]) - want) < 1e-6


@pytest.fixture(scope="module")
def evaluated(debug_run, scorer_dir, tmp_path_factory):
    """The fixture report store, with the debug checkpoint's out-of-family evaluation (i2L and a zero LoRA)."""
    from i2l.infer.api import I2L

    root = tmp_path_factory.mktemp("ood")
    store, _ = make_fixture_store(root)
    cfg = get_config("debug")
    cfg.data_root = str(debug_run.data_root)
    cfg.scorer.clip_checkpoint = str(scorer_dir)
    model = I2L.load(debug_run.checkpoint_dir, data_root=cfg.data_root)
    got = evaluate_out_of_family(model, cfg, EVAL_RUN, root / "ood", store.path.parent)
    targets = model.backbone.lora_targets()

    def zero(refs):
        return LoRA({k: torch.zeros(2, v[0]) for k, v in targets.items()},
                    {k: torch.zeros(v[1], 2) for k, v in targets.items()}, model.backbone.backbone_id)

    nothing = evaluate_out_of_family(model, cfg, "zero-run", root / "zero", store.path.parent, predict=zero)
    store.record_out_of_family(got["rows"])
    return store, got, nothing, cfg


def test_every_foreign_style_is_drawn_by_base_and_i2l_and_the_margin_computed(evaluated):
    store, got, _, cfg = evaluated
    rows = store.query("SELECT * FROM out_of_family WHERE run_id = ?", [EVAL_RUN])
    n, k = cfg.eval.foreign_styles, cfg.eval.foreign_prompts
    assert len(rows) == 3 * n * k and set(rows.method) == {"base", "i2l_4ref", "i2l_4ref_asym"}
    assert rows.style_id.nunique() == n
    assert (rows.groupby(["method", "style_id"]).prompt.nunique() == k).all()
    assert rows.groupby("prompt").seed.nunique().eq(1).all()  # one seed per prompt, for every style and method
    assert rows.margin.notna().all() and (store.path.parent / rows.image_path.iloc[0]).is_file()
    s = got["summary"]
    assert s["styles"] == n and abs(s["mean_margin"]["base"]) < 1e-5  # the same base image for every style
    assert s == margin_summary(rows.to_dict("records"))
    assert s["i2l_method"] == "i2l_4ref"
    assert s["i2l_minus_base"] == pytest.approx(s["mean_margin"]["i2l_4ref"] - s["mean_margin"]["base"])
    asym = s["vs_base"]["i2l_4ref_asym"]
    assert asym["minus_base"] == pytest.approx(s["mean_margin"]["i2l_4ref_asym"] - s["mean_margin"]["base"])
    # the gray-image LoRA on the negative branch draws other images than the style's own LoRA there
    paths = rows.set_index(["method", "style_id", "prompt"]).image_path
    pixels = {m: np.stack([np.asarray(Image.open(store.path.parent / f)) for f in paths[m].sort_index()])
              for m in ("i2l_4ref", "i2l_4ref_asym")}
    assert (pixels["i2l_4ref"] != pixels["i2l_4ref_asym"]).any()


def test_a_lora_that_does_nothing_scores_zero(evaluated):
    _, _, nothing, _ = evaluated
    s = nothing["summary"]
    assert abs(s["i2l_minus_base"]) < 1e-5 and abs(s["mean_margin"]["i2l_4ref"]) < 1e-5
    assert abs(s["vs_base"]["i2l_4ref_asym"]["minus_base"]) < 1e-5  # its gray LoRA is zero too
    base = {(r["style_id"], r["prompt"]): r["margin"] for r in nothing["rows"] if r["method"] == "base"}
    for r in nothing["rows"]:
        assert r["margin"] == pytest.approx(base[(r["style_id"], r["prompt"])], abs=1e-6)


def test_the_report_shows_the_out_of_family_grid_and_number(evaluated, tmp_path):
    from i2l.report.build import build_report

    store, got, _, _ = evaluated
    html = build_report(store, PIPELINE_RUN, out_dir=tmp_path / "report").read_text()
    section = html[html.index('<h2 id="out_of_family">'):]
    assert 'data-figure="out_of_family_grid"' in section and "shown as n/a" not in section  # every image found
    for m, v in got["summary"]["vs_base"].items():
        assert f"{m} − base = {v['minus_base']:+.4f}" in section
    assert (tmp_path / "report" / "figures" / "out_of_family_grid.png").is_file()
    assert "Out-of-family styles" in (tmp_path / "report" / "report.md").read_text()
