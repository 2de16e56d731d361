"""The per-style baseline as the amortization benchmark times it, and `i2l bench amortization` itself on the
debug world: early stop at i2L's loss, the checking time left out of the per-style wall time, the fastest
per-style set-up counted, and the goal arithmetic."""

import argparse
import math
import time

import pytest
import torch

from i2l.backbones import load_backbone
from i2l.baselines.per_style import optimize_lora
from i2l.config import get_config
from i2l.layout import resolve_paths
from i2l.model.lora import LoRA


def _debug_backbone(debug_run):
    cfg = get_config("debug")
    cfg.data_root = str(debug_run.data_root)
    cfg = resolve_paths(cfg)
    return cfg, load_backbone(cfg)


def test_per_style_stops_when_asked_and_does_not_count_the_check(debug_run):
    cfg, bb = _debug_backbone(debug_run)
    images = torch.rand(3, 3, cfg.backbone.image_size, cfg.backbone.image_size) * 2 - 1
    prompts = ["one small circle in the center"] * 3
    seen = []

    def stop(snap):
        seen.append(snap["steps"])
        time.sleep(2.0)  # a slow check (a held-out loss) must not count as optimisation time
        return snap["steps"] == 4

    final, curve = optimize_lora(bb, images, prompts, rank=2, steps=10, lr=1e-2, seed=0, snapshots=(2, 4, 8),
                                 batch_size=2, stop=stop)
    assert seen == [2, 4] and [c["steps"] for c in curve] == [2, 4]
    assert final.meta["steps"] == 4
    # one sleep would exceed this; two debug steps take ~0.05 s (2 s of margin for a loaded CI machine)
    assert curve[1]["wall_s"] < 2.0 + curve[0]["wall_s"], [c["wall_s"] for c in curve]
    # stopping changes nothing before the stop: same seed, same LoRA at step 4 as a run to 10 steps
    _, full = optimize_lora(bb, images, prompts, rank=2, steps=10, lr=1e-2, seed=0, snapshots=(4,), batch_size=2)
    name = next(iter(final.A))
    # (allclose, not equal: a BLAS may round differently from run to run on a loaded machine; another LoRA would
    # differ by ~1e-2 after 4 Adam steps at lr 1e-2)
    assert torch.allclose(full[0]["lora"].B[name], curve[1]["lora"].B[name], atol=1e-6)


def test_per_style_can_lend_snapshots_to_stop_without_keeping_them(debug_run):
    """The amortization bench checks every step: a real-size LoRA per step must not pile up in memory."""
    cfg, bb = _debug_backbone(debug_run)
    images = torch.rand(2, 3, cfg.backbone.image_size, cfg.backbone.image_size) * 2 - 1
    lent = []
    _, curve = optimize_lora(bb, images, ["one small circle in the center"] * 2, rank=2, steps=3, lr=1e-2, seed=0,
                             snapshots=(1, 2, 3), batch_size=2, stop=lambda snap: lent.append(snap["lora"]) and False,
                             keep_loras=False)
    assert len(lent) == 3 and all(isinstance(lo, LoRA) for lo in lent)
    assert [c["steps"] for c in curve] == [1, 2, 3] and not any("lora" in c for c in curve)


def test_per_style_wall_time_leaves_out_the_snapshot_copies(debug_run, monkeypatch):
    """Checked after every step, a real-size LoRA copy per step would otherwise count as optimisation time."""
    import i2l.baselines.per_style

    class SlowCopy(LoRA):
        def __post_init__(self):
            super().__post_init__()
            if not next(iter(self.A.values())).requires_grad:  # a snapshot's frozen copy, not the trained LoRA
                time.sleep(1.0)

    monkeypatch.setattr(i2l.baselines.per_style, "LoRA", SlowCopy)
    cfg, bb = _debug_backbone(debug_run)
    images = torch.rand(2, 3, cfg.backbone.image_size, cfg.backbone.image_size) * 2 - 1
    _, curve = optimize_lora(bb, images, ["one small circle in the center"] * 2, rank=2, steps=3, lr=1e-2, seed=0,
                             snapshots=(1, 2, 3), batch_size=2, keep_loras=False)
    # steps 2 and 3 take ~0.03 s (step 1 may carry a first-backward warm-up on a loaded machine); counted, the
    # copies made after steps 1 and 2 would put 2 s between the first and the last record
    assert curve[-1]["wall_s"] - curve[0]["wall_s"] < 1.0, [c["wall_s"] for c in curve]


def test_bench_amortization_checks_the_per_style_loss_after_every_step():
    """A sparse check grid (1, 2, 3, 5, 8, ...) rounds the per-style steps to match up, in i2L's favour."""
    from i2l.bench.amortization import check_steps

    assert check_steps(300) == tuple(range(1, 301))


def test_bench_amortization_takes_eval_settings_from_the_preset_and_set(debug_run):
    """The per-style lrs come from the checkpoint's preset as the code has it now (+ --set eval.*), as eval-loss
    takes them, not from the settings saved with an older checkpoint; other fields cannot be --set here."""
    from i2l.bench.amortization import add_arguments, run

    def bench(*extra):
        p = argparse.ArgumentParser()
        add_arguments(p)
        return run(p.parse_args(["--checkpoint", str(debug_run.run_dir), "--data", str(debug_run.prepared_dir),
                                 "--data-root", str(debug_run.data_root), "--styles", "1", "--max-steps", "1",
                                 "--per-style-batches", "2", *extra]))

    rows = bench("--set", "eval.lora_lr=0.02")
    setups = {r["case"].split("/", 1)[1] for r in rows if r["metric"].startswith("per_style_steps")}
    assert setups == {"rows2/lr0.01", "rows2/lr0.02", "rows2/lr0.04"}
    with pytest.raises(ValueError, match="only eval"):
        bench("--set", "predictor.rank=8")


def test_bench_amortization_tries_per_style_learning_rates_around_the_configured_one():
    from i2l.bench.amortization import _parse_lrs

    assert _parse_lrs("", 5e-3) == [2.5e-3, 5e-3, 1e-2]  # default: half, once, twice eval.lora_lr
    assert _parse_lrs("1e-3, 3e-3", 5e-3) == [1e-3, 3e-3]
    with pytest.raises(ValueError, match="per-style-lrs"):
        _parse_lrs("0,1e-3", 5e-3)


def test_bench_amortization_counts_the_fastest_per_style_setup(debug_run, capsys):
    from i2l.bench import format_rows
    from i2l.bench.amortization import GOAL, add_arguments, run

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--checkpoint", str(debug_run.run_dir), "--data", str(debug_run.prepared_dir),
                         "--data-root", str(debug_run.data_root), "--styles", "2", "--max-steps", "3",
                         "--per-style-batches", "2,4", "--per-style-lrs", "5e-3,2e-2"])
    rows = run(args)
    assert "per-style runs to i2L's loss" in capsys.readouterr().err  # progress: 2 styles x 4 set-ups
    by = {(r["case"], r["metric"]): r["value"] for r in rows}
    styles = [c for c, m in by if m == "i2l_loss"]
    assert len(styles) == 2
    # the forwards are priced once, beside the per-style steps: every style's ratio divides by that one price
    t_alone, t_batched = by[("all", "i2l_forward_alone_s")], by[("all", "i2l_forward_batched_s")]
    assert 0 < t_batched and 0 < t_alone and not any(m == "i2l_forward_s" for _, m in by)
    for s in styles:
        setups = {}
        for b, lr in [(2, "0.005"), (2, "0.02"), (4, "0.005"), (4, "0.02")]:  # every batch x learning rate
            case = f"{s}/rows{b}/lr{lr}"
            (tail,) = [t for t in ("to_match", "not_reached", "outpaced") if (case, f"per_style_s_{t}") in by]
            wall, steps = by[(case, f"per_style_s_{tail}")], by[(case, f"per_style_steps_{tail}")]
            assert wall > 0 and 1 <= steps <= 3 and (tail != "not_reached" or steps == 3)
            # priced at the median step time of its rows, not by its own clock (one slow moment of a shared
            # machine would decide the style)
            assert math.isclose(wall, steps * by[(f"rows{b}", "per_style_step_s")])
            setups[(b, lr)] = (tail, wall)
        # a set-up that reached i2L's loss wins over one that did not, then the faster one
        hit, wall = max(((t == "to_match", w) for t, w in setups.values()), key=lambda hw: (hw[0], -hw[1]))
        # a set-up is only stopped early as outpaced once an earlier one has reached, and only past its time
        for t, w in setups.values():
            assert t != "outpaced" or (hit and w >= wall)
        ratio = by[(s, "amortization" if hit else "amortization_lower_bound")]
        assert math.isclose(ratio, wall / t_alone)
    for b in (2, 4):
        t_step = by[(f"rows{b}", "per_style_step_s")]
        assert by[(f"rows{b}/alone", "goal_needs_steps")] == math.ceil(GOAL * t_alone / t_step)
        assert by[(f"rows{b}/batched", "goal_needs_steps")] == math.ceil(GOAL * t_batched / t_step)
    med = next(r for r in rows if r["case"] == "median" and r["metric"] == "amortization")
    assert med["value"] == pytest.approx(sum(  # the median of the 2 styles' ratios (goal_met: the next test)
        v for (c, m), v in by.items() if c in styles and m.startswith("amortization")) / 2)
    assert "goal" in format_rows(rows)


def test_bench_amortization_prices_every_case_in_the_same_rounds():
    """The per-style steps and i2L's forwards are timed in turn, round after round: on a machine whose speed drifts
    the whole time, each median is taken over the same moments, so their ratio is the ratio of the work (timed one
    after the other, the drift between them would enter it)."""
    from i2l.bench.amortization import side_by_side

    calls, speed = [], iter(1.0 + 0.02 * k for k in range(1000))  # the machine slows by 2 % per call

    def case(name: str, work: float):
        def run() -> float:
            calls.append(name)
            return work * next(speed)  # the case's own timing of its unit: what side_by_side must keep
        return run

    prices = side_by_side({"step": case("step", 10.0), "forward": case("forward", 1.0)}, rounds=5)
    assert calls == ["step", "forward"] * 6  # one untimed round, then 5
    # 9.82: within 2 %; priced one after the other (every step round, then every forward round) it would be 8.98
    assert prices["step"] / prices["forward"] == pytest.approx(10.0, rel=0.02)


def test_bench_amortization_median_of_lower_bounds_meets_the_goal_only_at_or_above_it():
    """A style never matched gives a lower bound; a median over lower bounds is one too: at or above the goal it
    proves the goal met (the true median is larger), below it it is no proof and counts as not met."""
    from i2l.bench.amortization import GOAL, median_rows

    def judged_medians(walls, t_fwd=1e-3, t_batched=1e-3):
        rows = median_rows(walls, [t_fwd] * len(walls), t_batched)
        return {r["metric"]: (r["value"], r["goal_met"], "lower bound" in r["unit"]) for r in rows}

    met = judged_medians([(2.0, True), (1.5, False), (3.0, True)])  # medians 2.0 s -> 2000x, one a lower bound
    assert met == {"amortization": (2000.0, True, True), "amortization_batched": (2000.0, True, True)}
    short = judged_medians([(0.5, True), (0.4, False), (3.0, False)])  # 500x: unknown, so not met
    assert short["amortization"] == (500.0, False, True)
    exact = judged_medians([(0.5, True), (0.4, True), (3.0, True)], t_batched=2e-4)  # every style reached
    assert exact == {"amortization": (500.0, False, False), "amortization_batched": (2500.0, True, False)}
    assert GOAL == 1000


def test_eval_loss_command_places_i2l_on_the_per_style_curve(debug_run, tmp_path, capsys):
    """`i2l eval-loss`: every method's held-out loss on the same grid, recorded in the store."""
    from i2l.cli import main as cli
    from i2l.store import Store

    store = tmp_path / "results.duckdb"
    assert cli(["eval-loss", "--preset", "debug", "--data-root", str(debug_run.data_root), "--checkpoint",
                str(debug_run.run_dir), "--data", str(debug_run.prepared_dir), "--styles", "2", "--budgets", "1,3",
                "--store", str(store)]) == 0
    table = capsys.readouterr().out
    methods = {"base", "gray_lora", "i2l_1ref", "i2l_4ref", "i2l_wrong_style", "per_style@1", "per_style@3"}
    assert all(m in table for m in methods)
    got = Store(store).query("SELECT method, style_id, n_refs, steps, wall_s, loss FROM eval_losses")
    assert set(got.method) == methods and (got.groupby("method").size() == 2).all()
    m = got.groupby("method").first()
    assert m.loc["per_style@3", "steps"] == 3 and m.loc["per_style@3", "wall_s"] > m.loc["per_style@1", "wall_s"]
    assert m.loc["i2l_4ref", "n_refs"] == 4 and m.loc["base", "wall_s"] == 0


def test_eval_loss_command_takes_eval_settings_from_the_command_line(debug_run, tmp_path, monkeypatch, capsys):
    """As `i2l evaluate`: the model from the checkpoint, the `eval` section from --preset / --set (grid, seed of
    the per-style optimisation); an unknown preset or field is refused before anything runs."""
    import inspect
    import json

    from i2l.cli import main as cli
    from i2l.eval import methods as eval_methods
    from i2l.eval.heldout_loss import heldout_loss, load_val_samples
    from i2l.store import Store

    real, seeds = eval_methods.per_style_conditionings, []

    def per_style(*a, **kw):  # the real optimisation; notes the seed it is given
        seeds.append(inspect.signature(real).bind(*a, **kw).arguments["seed"])
        return real(*a, **kw)

    monkeypatch.setattr(eval_methods, "per_style_conditionings", per_style)
    store = tmp_path / "results.duckdb"
    args = ["eval-loss", "--preset", "debug", "--data-root", str(debug_run.data_root), "--checkpoint",
            str(debug_run.run_dir), "--data", str(debug_run.prepared_dir), "--styles", "2", "--budgets", "2",
            "--store", str(store)]
    grid = ["--set", "eval.fm_timesteps=2", "--set", "eval.fm_noise_seeds=2", "--set", "eval.seed=7",
            "--set", "train.seed=3"]
    assert cli(args + grid) == 0
    assert seeds == [7]  # eval.seed, as the evaluate stage (not train.seed)
    run_cfg = json.loads(Store(store).rows("SELECT config FROM runs WHERE kind = 'eval_loss'")[0][0])
    assert (run_cfg["eval"]["fm_timesteps"], run_cfg["eval"]["fm_noise_seeds"], run_cfg["eval"]["seed"]) == (2, 2, 7)
    cfg, bb = _debug_backbone(debug_run)
    samples = load_val_samples(debug_run.prepared_dir, limit=2)
    want = {s.style_id: heldout_loss(bb, s, None, cfg.backbone.image_size, 2, 2, i) for i, s in enumerate(samples)}
    got = Store(store).query("SELECT style_id, loss FROM eval_losses WHERE method = 'base'")
    assert dict(zip(got.style_id, got.loss)) == pytest.approx(want)  # the 2 x 2 grid asked for
    capsys.readouterr()
    for bad, why in ((["--preset", "nope"], "unknown preset 'nope'"),
                     (["--set", "eval.nope=1"], "unknown config field 'eval.nope'")):
        assert cli(args + bad) == 2
        assert why in capsys.readouterr().err
    assert seeds == [7]  # nothing ran for the refused ones


def test_bench_amortization_stops_setups_that_can_no_longer_win(debug_run, monkeypatch):
    """Once one per-style set-up has reached i2L's loss, a slower one cannot count: each later set-up is stopped
    when its price (steps x its rows' step time) passes the winner's, long before --max-steps, and recorded as
    outpaced, not as reached."""
    import i2l.eval.heldout_loss
    from i2l.bench.amortization import add_arguments, run

    real, checks = i2l.eval.heldout_loss.heldout_loss, []

    def loss(bb, sample, lora, *a, **k):  # i2L's and the base's losses are real; the per-style checks scripted
        if lora is None or "checkpoint" in lora.meta:
            return real(bb, sample, lora, *a, **k)
        checks.append(lora)
        return -1.0 if len(checks) == 1 else 1e9  # the first check of the first set-up reaches, no other does

    monkeypatch.setattr(i2l.eval.heldout_loss, "heldout_loss", loss)
    p = argparse.ArgumentParser()
    add_arguments(p)
    rows = run(p.parse_args(["--checkpoint", str(debug_run.run_dir), "--data", str(debug_run.prepared_dir),
                             "--data-root", str(debug_run.data_root), "--styles", "1", "--max-steps", "40",
                             "--per-style-batches", "2,4", "--per-style-lrs", "5e-3,2e-2"]))
    by = {(r["case"].split("/", 1)[-1], r["metric"]): r["value"] for r in rows}
    assert by[("rows2/lr0.005", "per_style_steps_to_match")] == 1
    won = by[("rows2/lr0.005", "per_style_s_to_match")]
    for setup in ("rows2/lr0.02", "rows4/lr0.005", "rows4/lr0.02"):
        assert (setup, "per_style_steps_not_reached") not in by  # without the stop: 40 steps, not reached
        t_step = by[(setup.split("/")[0], "per_style_step_s")]
        steps = by[(setup, "per_style_steps_outpaced")]  # stopped at the first step priced at the winner's or more
        assert steps < 40 and steps * t_step >= won > (steps - 1) * t_step
        assert math.isclose(by[(setup, "per_style_s_outpaced")], steps * t_step)
    (ratio,) = [r["value"] for r in rows if r["metric"] == "amortization" and r["case"] != "median"]
    (fwd,) = [r["value"] for r in rows if r["metric"] == "i2l_forward_alone_s"]
    assert math.isclose(ratio, won / fwd)
