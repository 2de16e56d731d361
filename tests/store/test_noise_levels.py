"""Held-out gain by noise level: the bands add up to the overall gain, the store keeps the per-t losses (and reads
stores written before it did), the report shows the breakdown."""

from __future__ import annotations

import random

import pytest

from i2l.store import MIGRATIONS, Store, queries
from i2l.store.noise_levels import band_labels, format_gains_by_noise_level, gains_by_noise_level


def _rows(methods: dict[str, float], styles=("s1", "s2", "s3"), K: int = 8, seed: int = 0) -> list[dict]:
    """Per style and method a random per-t loss curve; each method scales the base's by its own factor per t."""
    rng = random.Random(seed)
    base = {s: [rng.uniform(0.1, 0.9) for _ in range(K)] for s in styles}
    rows = []
    for m, strength in {"base": 0.0, **methods}.items():
        for s in styles:
            by_t = [b * (1 - strength * rng.uniform(0, 1)) for b in base[s]]
            rows.append({"method": m, "style_id": s, "n_refs": 0, "steps": 0, "wall_s": 0.0,
                         "loss": sum(by_t) / K, "loss_by_t": by_t})
    return rows


def _mean_loss(rows, method):
    got = [r["loss"] for r in rows if r["method"] == method]
    return sum(got) / len(got)


def test_bands_add_up_to_the_overall_gain_and_each_sums_its_timesteps():
    rows = _rows({"per_style@25": 0.3, "i2l_4ref": 0.1})
    gains = {g["method"]: g for g in gains_by_noise_level(rows)}
    assert set(gains) == {"per_style@25", "i2l_4ref"}  # the base is what the others are compared to
    for m, g in gains.items():
        overall = 100 * (1 - _mean_loss(rows, m) / _mean_loss(rows, "base"))  # the negative of "vs base"
        assert g["gain"] == pytest.approx(overall, abs=1e-9) and sum(g["bands"]) == pytest.approx(overall)
        assert g["styles"] == 3
        # by hand: the grid t_k = (k + 0.5) / 8 puts timesteps 2b and 2b + 1 in band b
        mean = lambda meth, k: sum(r["loss_by_t"][k] for r in rows if r["method"] == meth) / 3
        total = sum(mean("base", k) for k in range(8))
        for b in range(4):
            want = sum(100 * (mean("base", k) - mean(m, k)) / total for k in (2 * b, 2 * b + 1))
            assert g["bands"][b] == pytest.approx(want)
    assert gains["per_style@25"]["gain"] > gains["i2l_4ref"]["gain"] > 0


def test_a_band_without_timesteps_is_empty_and_incomplete_rows_are_left_out():
    # the debug grid, K = 3: t = 1/6, 1/2, 5/6 -> no timestep in 0.25 <= t < 0.5
    rows = _rows({"i2l_4ref": 0.2}, K=3)
    (g,) = gains_by_noise_level(rows)
    assert g["bands"][1] is None and all(v is not None for v in g["bands"][:1] + g["bands"][2:])
    assert g["gain"] == pytest.approx(100 * (1 - _mean_loss(rows, "i2l_4ref") / _mean_loss(rows, "base")))
    assert "–" in format_gains_by_noise_level([g]).splitlines()[-1]
    # a style only the method has, and rows from before the breakdown (no loss_by_t), do not count
    extra = [{"method": "i2l_4ref", "style_id": "s9", "loss_by_t": [0.0, 0.0, 0.0]},
             {"method": "i2l_4ref", "style_id": "s1", "loss_by_t": None}]
    (again,) = gains_by_noise_level(rows + extra)
    assert again["styles"] == 3 and again["gain"] == pytest.approx(g["gain"])
    assert gains_by_noise_level([r for r in rows if r["method"] != "base"]) == []  # nothing to compare to
    assert gains_by_noise_level([{**r, "loss_by_t": None} for r in rows]) == []


def test_band_labels_cover_zero_to_one():
    assert band_labels(4) == ["t < 0.25", "0.25 ≤ t < 0.5", "0.5 ≤ t < 0.75", "t ≥ 0.75"]
    assert band_labels(2) == ["t < 0.5", "t ≥ 0.5"] and band_labels(1) == ["all t"]


def test_the_store_keeps_per_t_losses_and_reads_rows_from_before_them(tmp_path):
    old = Store(tmp_path / "r.duckdb", auto_migrate=False)
    old.migrate(upto=[name for name, _ in MIGRATIONS].index("eval_losses_by_t"))
    rows = _rows({"i2l_4ref": 0.2})
    with old.transaction() as con:  # an evaluation recorded before the breakdown: 7 columns, no loss_by_t
        con.executemany("INSERT INTO eval_losses VALUES ('e0', ?, ?, 0, 0, 0.0, ?)",
                        [[r["method"], r["style_id"], r["loss"]] for r in rows])
    # opened read-only, as `i2l report` opens it, the store is not migrated: no breakdown, and no error
    assert queries.gains_by_noise_level(Store(tmp_path / "r.duckdb", read_only=True), "e0") == []
    store = Store(tmp_path / "r.duckdb")
    assert store.version == len(MIGRATIONS)
    assert queries.gains_by_noise_level(store, "e0") == []  # kept, with no breakdown to show
    assert store.rows("SELECT count(*) FROM eval_losses WHERE run_id = 'e0' AND loss_by_t IS NULL")[0][0] == 6
    store.record_eval_loss("e1", rows)
    store.record_eval_loss("e1", [{"method": "gray_lora", "style_id": "s1", "n_refs": 0, "steps": 0,
                                   "wall_s": 0.0, "loss": 0.3}])  # a row without its breakdown
    got = {g["method"]: g for g in queries.gains_by_noise_level(store, "e1")}
    want = {g["method"]: g for g in gains_by_noise_level(rows)}
    assert set(got) == set(want) == {"i2l_4ref"}
    assert got["i2l_4ref"]["bands"] == pytest.approx(want["i2l_4ref"]["bands"])  # DOUBLE[] round-trips
    v = store.rows("SELECT loss_by_t FROM eval_losses WHERE run_id = 'e1' AND method = 'base' "
                   "AND style_id = 's2'")[0][0]
    assert v == next(r["loss_by_t"] for r in rows if r["method"] == "base" and r["style_id"] == "s2")


def test_the_text_table_shows_a_tiny_loss_as_zero_not_minus_zero():
    text = format_gains_by_noise_level([{"method": "mean_lora", "styles": 1, "bands": [-0.04, 0.2, None, 0.0],
                                         "gain": -0.04}])
    assert text.splitlines()[-1].split() == ["mean_lora", "0.0", "0.2", "–", "0.0", "0.0"]
