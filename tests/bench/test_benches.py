"""`i2l bench cfg` and `i2l bench produce` through the CLI on the debug preset: every case timed, the ratios
computed from the stored figures, the goal judged and recorded with the figure."""

import json

import pytest


def _figures(store, bench: str) -> dict:
    from i2l.store import Store

    df = Store(store).query(f"SELECT case_name, metric, value, unit, extra FROM benchmarks WHERE bench = '{bench}'")
    return {(r.case_name, r.metric): r for r in df.itertuples()}


@pytest.fixture
def two_threads():
    """The caller's torch thread count, set apart from the benches' 1 so a leaked setting shows."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_bench_cfg_times_both_samplers_and_judges_asymmetric_against_plain(tmp_path, capsys, two_threads,
                                                                           monkeypatch):
    import torch

    import i2l.bench.cfg
    from i2l.cli import main
    from i2l.infer.guidance import FASTER_PASSES

    assert i2l.bench.cfg.GOALS == {"asymmetric/plain": ("<=", 1.05)}
    monkeypatch.setitem(i2l.bench.cfg.GOALS, "asymmetric/plain", ("<=", 0.0))  # no timing meets it: missed
    store = tmp_path / "results.duckdb"
    assert main(["bench", "cfg", "--preset", "debug", "--batch", "2", "--steps", "2", "--rounds", "2",
                 "--warmup", "1", "--threads", "1", "--store", str(store)]) == 0
    assert torch.get_num_threads() == two_threads  # timed with 1 thread, the caller's setting given back
    assert "asymmetric/plain" in capsys.readouterr().out
    fig = _figures(store, "cfg")
    cpu = {c: fig[(c, "cpu_ms_per_step")].value for c in ("plain", "asymmetric", "asymmetric_split", "same_lora",
                                                          "same_lora_split", "two_pass_batch", "two_pass_per_sample")}
    assert all(v > 0 for v in cpu.values())
    ratio = fig[("asymmetric/plain", "ratio")]
    assert ratio.value == pytest.approx(cpu["asymmetric"] / cpu["plain"], rel=0.01, abs=2e-3)  # both rounded
    extra = json.loads(ratio.extra)
    assert (extra["goal"], extra["goal_met"]) == ("<= 0", False)
    assert "goal" not in json.loads(fig[("two_pass_batch/asymmetric", "ratio")].extra)  # only the goal's ratio
    for k in ("two_pass_batch", "two_pass_per_sample", "asymmetric_split"):  # every arrangement: the same images
        assert fig[(f"asymmetric_vs_{k}", "max_abs_diff")].value < 1e-4
    assert fig[("same_lora_vs_same_lora_split", "max_abs_diff")].value < 1e-4
    for k in ("asymmetric", "same_lora"):  # what `auto` runs on this device against the faster one of this run
        row = fig[(f"auto_{k}", "picks_faster")]
        picked = json.loads(row.extra)
        faster = "joint" if cpu[k] <= cpu[f"{k}_split"] else "split"
        assert picked["auto"] == FASTER_PASSES["cpu"] and picked["faster"] == faster
        assert row.value == int(faster == FASTER_PASSES["cpu"])


@pytest.mark.usefixtures("ray_session")
def test_bench_produce_times_one_and_two_actors_and_judges_the_speed_up(tmp_path, capsys, two_threads,
                                                                       monkeypatch):
    import torch

    import i2l.bench.produce
    from i2l.cli import main

    assert i2l.bench.produce.GOALS == {"2_actors/1_actor": (">=", 1.7)}
    monkeypatch.setitem(i2l.bench.produce.GOALS, "2_actors/1_actor", (">=", 0.0))  # every timing meets it: met
    store = tmp_path / "results.duckdb"
    assert main(["bench", "produce", "--preset", "debug", "--styles", "4", "--refs", "1", "--batch-size", "2",
                 "--workers", "1,2", "--store", str(store)]) == 0
    assert "2_actors/1_actor" in capsys.readouterr().out
    assert torch.get_num_threads() == two_threads
    fig = _figures(store, "produce")
    rate = {w: fig[(f"{w}_actors", "loras_per_s")].value for w in (1, 2)}
    assert all(v > 0 for v in rate.values())
    ratio = fig[("2_actors/1_actor", "ratio")]
    assert ratio.value == pytest.approx(rate[2] / rate[1], rel=0.02)  # both rounded to 2 digits
    extra = json.loads(ratio.extra)
    assert (extra["goal"], extra["goal_met"]) == (">= 0", True)


def test_bench_cfg_times_a_real_preset_at_its_architecture(tmp_path, capsys, two_threads):
    """A real preset is timed on its own architecture with random weights: here FLUX.2-klein's, read from a replica
    of the published checkpoint (sizes shrunk), as `--set backbone.path=` points a user at a local checkout."""
    from i2l.cli import main
    from i2l.replicas import write_replica

    replica = write_replica("FLUX.2-klein-base-4B", tmp_path / "replicas")
    store = tmp_path / "results.duckdb"
    assert main(["bench", "cfg", "--preset", "klein4b", "--set", f"backbone.path={replica}", "--set",
                 "backbone.image_size=32", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "0",
                 "--store", str(store)]) == 0
    fig = _figures(store, "cfg")
    assert all(json.loads(r.extra)["preset"] == "klein4b" for r in fig.values())
    assert fig[("asymmetric_split", "cpu_ms_per_step")].value > 0
    for ref, k in (("asymmetric", "asymmetric_split"), ("same_lora", "same_lora_split")):
        assert fig[(f"{ref}_vs_{k}", "max_abs_diff")].value < 1e-4  # fp32 on the CPU: the same images
