"""The evaluation stage on the debug world: every method's samples and scores land in the store, skipped
scorers are recorded as skipped, the same prompt and seed for every method, batching does not change an
image, and a re-run does no work."""

import dataclasses
from pathlib import Path

import pytest
import torch

from i2l.baselines.per_style import optimize_lora, optimize_loras
from i2l.config import get_config
from i2l.eval.methods import Conditioning
from i2l.eval.stage import FAMILIES, draw, evaluate
from i2l.store import Store

METHODS = {"base", "mean_lora", "per_style@2", "per_style@5", "i2l_1ref", "i2l_4ref", "i2l_1ref_asym",
           "i2l_4ref_asym", "adapter"}


def _cfg(debug_run, scorer_dir):
    cfg = get_config("debug")
    cfg.data_root = str(debug_run.data_root)
    cfg.scorer.clip_checkpoint = str(scorer_dir)
    return cfg


@pytest.fixture(scope="module")
def evaluated(debug_run, scorer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    store = Store(root / "results.duckdb")
    cfg = _cfg(debug_run, scorer_dir)
    info = evaluate(cfg, debug_run.prepared_dir, debug_run.run_dir, store, out_dir=root / "eval",
                    progress=False)
    return store, info, cfg


def _count(store, table):
    return store.rows(f"SELECT count(*) FROM {table}")[0][0]


def test_every_method_has_samples_images_and_scores(evaluated):
    store, info, cfg = evaluated
    run = info["run_id"]
    samples = store.query("SELECT * FROM samples WHERE run_id = ?", [run])
    n = info["samples"]  # one per held-out style, at most eval.styles (the debug world holds fewer)
    assert 2 <= n <= cfg.eval.styles and samples.style_id.nunique() == n and set(samples.method) == METHODS
    assert samples.groupby("method").size().eq(n).all()
    root = store.path.parent
    assert all((root / p).is_file() for p in samples.image_path)  # relative to the store's directory
    # the same prompt and seed for every method on a held-out sample
    per_style = samples.groupby("style_id").agg(prompts=("prompt", "nunique"), seeds=("seed", "nunique"))
    assert (per_style.prompts == 1).all() and (per_style.seeds == 1).all()
    scores = store.query("SELECT s.method, sc.* FROM scores sc JOIN samples s USING (sample_id) "
                         "WHERE run_id = ?", [run])
    ok = scores[scores.status == "ok"]
    for metric in ("clip_text", "clip_style", "ref_style_sim", "leakage"):
        assert set(ok[ok.metric == metric].method) == METHODS
    skipped = scores[scores.metric.isin(["aesthetic", "pickscore", "imagereward", "hpsv2", "hpsv3"])]
    assert len(skipped) == 5 * len(samples) and (skipped.status == "skipped").all()
    assert skipped.value.isna().all() and skipped.reason.str.len().gt(0).all()


def test_methods_wall_times_losses_and_loras_are_recorded(evaluated):
    store, info, cfg = evaluated
    run = info["run_id"]
    m = store.query("SELECT * FROM methods WHERE run_id = ?", [run]).set_index("method")
    assert m.loc["per_style@5", "wall_s"] > m.loc["per_style@2", "wall_s"] > 0
    assert m.loc["per_style@5", "budget_steps"] == 5 and m.loc["base", "wall_s"] == 0
    assert m.loc["i2l_4ref", "wall_s"] > 0 and m.loc["adapter", "wall_s"] > 0
    losses = store.query("SELECT * FROM eval_losses WHERE run_id = ?", [run])
    asym = {"i2l_1ref_asym", "i2l_4ref_asym"}
    assert set(losses.method) == METHODS - asym | {"gray_lora", "i2l_wrong_style"}  # CFG plays no part in FM
    assert losses.loss.gt(0).all() and losses.groupby("method").size().eq(info["samples"]).all()
    # each row also holds the loss at each timestep of the grid, whose mean is the row's loss
    T = cfg.eval.fm_timesteps
    by_t = [list(v) for v in losses.loss_by_t]
    assert all(len(v) == T for v in by_t)
    assert [sum(v) / T for v in by_t] == pytest.approx(losses.loss.tolist(), rel=1e-5)
    loras = store.query("SELECT * FROM loras")
    assert {"mean_lora", "per_style@2", "per_style@5", "i2l_1ref", "i2l_4ref"} <= set(loras.method)
    assert all(Path(p).is_file() for p in loras.path)
    asym = store.query("SELECT lora_id FROM samples WHERE run_id = ? AND method = 'i2l_4ref_asym'", [run])
    assert set(asym.lora_id) <= set(loras.lora_id)  # asym samples reuse the plain i2L LoRAs
    # the baselines were trained with the predictor's budget, each as its own run with its curve
    kids = store.query("SELECT kind, run_id FROM runs WHERE parent_id = ?", [run])
    assert set(kids.kind) == {"train_mean_lora", "train_adapter"}
    steps = store.rows("SELECT count(*) FROM train_curves WHERE run_id = ?", [kids.run_id.iloc[0]])[0][0]
    assert steps == 2  # debug_run's predictor trained 2 steps
    table = store.query("SELECT * FROM v_method_summary WHERE run_id = ? AND metric = 'overall'", [run])
    assert set(table.method) == METHODS


def test_rerun_does_no_work(evaluated, debug_run):
    store, info, cfg = evaluated
    before = {t: _count(store, t) for t in ("runs", "samples", "scores", "eval_losses", "loras", "methods")}
    again = evaluate(cfg, debug_run.prepared_dir, debug_run.run_dir, store, progress=False)
    assert again["skipped"] and again["run_id"] == info["run_id"]
    assert {t: _count(store, t) for t in before} == before


def test_missing_clip_scorer_is_recorded_as_skipped(debug_run, tmp_path):
    store = Store(tmp_path / "results.duckdb")
    cfg = _cfg(debug_run, tmp_path / "no-scorer")
    cfg.eval.styles = 2
    info = evaluate(cfg, debug_run.prepared_dir, debug_run.run_dir, store, out_dir=tmp_path / "eval",
                    families=("base",), progress=False)
    scores = store.query("SELECT * FROM scores")
    clip = scores[scores.metric.isin(["clip_text", "clip_style"])]
    assert len(clip) == 2 * info["samples"] and (clip.status == "skipped").all()
    assert clip.reason.str.contains("pretrain-scorer").all()
    with pytest.raises(ValueError, match="unknown method families"):
        evaluate(cfg, debug_run.prepared_dir, debug_run.run_dir, store, families=("bogus",), progress=False)
    assert set(FAMILIES) == {"base", "mean_lora", "per_style", "i2l", "adapter"}


def test_an_image_does_not_depend_on_its_batch(debug_run):
    from i2l.infer.api import I2L
    from i2l.model.lora import zero_lora

    model = I2L.load(debug_run.run_dir)
    ev = dataclasses.replace(model.cfg.eval, sample_steps=3)
    lora = zero_lora(model.backbone.lora_targets(), 2, model.backbone.backbone_id)
    g = torch.Generator().manual_seed(0)
    lora.B.update({k: torch.randn(v.shape, generator=g) for k, v in lora.B.items()})  # a LoRA that acts
    base = Conditioning("base", loras=[None, None])
    styled = Conditioning("i2l_1ref_asym", loras=[lora, lora], asym=True)
    alone = draw(model, ev, ["one circle"], [(base, 0)], [3])[0]
    mixed = draw(model, ev, ["two stars", "one circle"], [(styled, 0), (base, 1)], [5, 3])
    assert _diff(alone, mixed[1]) <= 1  # the same image up to float rounding, whatever it is batched with
    assert _diff(alone, draw(model, ev, ["one circle"], [(styled, 0)], [3])[0]) > 10  # while the LoRA does act


def test_styles_optimised_side_by_side_do_not_interact(debug_run):
    """Each style's loss is its own mean: a style's LoRA is the same whatever the other styles' data are."""
    from i2l.backbones import load_backbone

    cfg = get_config("debug")
    cfg.backbone.path = debug_run.cfg.backbone.path
    bb = load_backbone(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 3, 32, 32, generator=g) * 2 - 1  # (styles, N, 3, H, W)
    prompts = [["one circle", "two stars", "one ring"]] * 2
    final, curve = optimize_loras(bb, images[[0, 1]], prompts, 2, 3, lr=1e-2, seed=1, snapshots=(2, 3), rows=2)
    a = {c["steps"]: c["lora"] for c in curve}
    b = optimize_loras(bb, images[[0, 2]], prompts, 2, 3, lr=1e-2, seed=1, snapshots=(3,), rows=2)[0]
    name = a[3].names[0]
    assert set(a) == {2, 3} and a[3].batch_size == 2 and torch.equal(final.delta(name), a[3].delta(name))
    assert torch.allclose(a[3].delta(name)[0], b.delta(name)[0], atol=1e-6)
    assert not torch.allclose(a[3].delta(name)[1], b.delta(name)[1])
    assert a[3].delta(name)[0].abs().sum() > 0


def test_one_style_alone_is_a_batch_of_one(debug_run):
    """optimize_lora (one style) is optimize_loras on a batch of one: the same LoRA, unbatched."""
    from i2l.backbones import load_backbone

    cfg = get_config("debug")
    cfg.backbone.path = debug_run.cfg.backbone.path
    bb = load_backbone(cfg)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # (N, 3, H, W)
    prompts = ["one circle", "two stars", "one ring"]
    one, curve = optimize_lora(bb, images, prompts, 2, 3, lr=1e-2, seed=1, snapshots=(3,), batch_size=2)
    batch, _ = optimize_loras(bb, images[None], [prompts], 2, 3, lr=1e-2, seed=1, rows=2)
    name = one.names[0]
    assert not one.batched and batch.batch_size == 1 and one.meta == {"method": "per_style", "steps": 3}
    assert torch.equal(one.delta(name), batch[0].delta(name)) and torch.equal(curve[0]["lora"].B[name], one.B[name])


def test_one_reference_per_sample_makes_one_i2l_method_not_two_copies(debug_run):
    """Samples with one reference ask for i2L with (1, min(4, 1)) = (1, 1) references: one method, not the same
    method twice (which duplicated its loss rows)."""
    from i2l.eval.heldout_loss import load_val_samples
    from i2l.eval.methods import i2l_conditionings
    from i2l.infer.api import I2L

    model = I2L.load(debug_run.run_dir)
    samples = load_val_samples(debug_run.prepared_dir, limit=2)
    assert [c.method for c in i2l_conditionings(model, samples, (1, 1))] == ["i2l_1ref", "i2l_1ref_asym"]


def _diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())


def test_table1_rows_average_ok_scores_and_losses_per_method():
    from i2l.eval.table1 import format_table1, table1_rows

    conds = [Conditioning("base", wall_s=[0.0, 0.0]), Conditioning("i2l_1ref", wall_s=[0.2, 0.4])]
    samples = [{"sample_id": f"{m}/{i}", "method": m} for m in ("base", "i2l_1ref") for i in range(2)]
    scores = [{"sample_id": "base/0", "metric": "clip_style", "value": 10.0, "status": "ok"},
              {"sample_id": "base/1", "metric": "clip_style", "value": 20.0, "status": "ok"},
              {"sample_id": "i2l_1ref/0", "metric": "clip_style", "value": 30.0, "status": "ok"},
              {"sample_id": "i2l_1ref/1", "metric": "clip_style", "value": None, "status": "skipped"}]
    losses = [{"method": "i2l_1ref", "loss": 0.5}, {"method": "i2l_1ref", "loss": 0.7}]
    rows = table1_rows(conds, samples, scores, losses)
    assert rows == [{"method": "base", "wall_s": 0.0, "clip_style": 15.0},
                    {"method": "i2l_1ref", "wall_s": pytest.approx(0.3), "clip_style": 30.0,
                     "fm_loss": pytest.approx(0.6)}]
    text = format_table1(rows).splitlines()
    assert text[0].split()[:2] == ["method", "clip_style"] and text[1].split()[0] == "base"
    assert text[1].split()[-2] == "-" and text[2].split()[-2] == "0.6000"  # base has no held-out loss


def test_scoring_on_ray_actors_records_the_same_rows(debug_run, scorer_dir, tmp_path, ray_session):
    """scorer.workers=1: each configured scorer (the toy CLIP, ImageReward on its DiffSynth replica) scores in its
    own Ray actor from the saved images; the store gets the rows the in-process path records, value for value."""
    from i2l.replicas.scorers import IMAGE_METRICS

    IMAGE_METRICS["ImageReward"](tmp_path / "ImageReward")
    got = {}
    for workers in (0, 1):
        store = Store(tmp_path / f"w{workers}" / "results.duckdb")
        cfg = _cfg(debug_run, scorer_dir)
        cfg.eval.styles, cfg.scorer.workers, cfg.scorer.device = 2, workers, "cpu"
        cfg.scorer.imagereward_path = str(tmp_path / "ImageReward")
        info = evaluate(cfg, debug_run.prepared_dir, debug_run.run_dir, store, out_dir=tmp_path / f"w{workers}",
                        families=("base", "i2l"), progress=False)
        rows = store.query("SELECT * FROM scores")
        rows["sample_id"] = rows.sample_id.str.removeprefix(info["run_id"] + "/")
        got[workers] = rows.sort_values(["sample_id", "scorer", "metric"]).reset_index(drop=True)
    in_process, actors = got[0], got[1]
    assert len(in_process) == len(actors) > 0
    assert set(in_process.metric[in_process.status == "ok"]) >= {"clip_text", "clip_style", "imagereward"}
    import pandas as pd

    pd.testing.assert_frame_equal(in_process.drop(columns=["run_id"], errors="ignore"),
                                  actors.drop(columns=["run_id"], errors="ignore"), check_exact=True)
