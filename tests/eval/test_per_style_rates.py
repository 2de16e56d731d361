"""Each per-style budget at its own learning rate (eval.lora_lr_by_budget): the best fixed rate falls as the budget
grows, so one rate for every budget leaves some budgets short of their best. Budgets that share a rate share one
optimisation run; each LoRA is the one a run at its own rate gives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import PROMPTS, tiny_toy

from i2l.config import get_config
from i2l.eval.heldout_loss import ValSample, load_val_samples
from i2l.eval.methods import make_conditionings, per_style_conditionings
from i2l.infer.api import I2L
from i2l.train.step import timestep_sampler


def test_a_budget_takes_the_rate_of_the_largest_listed_budget_at_or_below_it():
    ev = get_config("debug", ["eval.lora_lr_by_budget=25:5e-3, 5:1e-2, 100:2.5e-3"]).eval  # any order
    assert [ev.per_style_lr(b) for b in (1, 5, 24, 25, 99, 100, 1000)] == [1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3,
                                                                           2.5e-3]
    plain = get_config("debug", ["eval.lora_lr=3e-3"]).eval
    assert [plain.per_style_lr(b) for b in (1, 100)] == [3e-3, 3e-3]  # none listed: eval.lora_lr everywhere
    for bad in ("5", "0:1e-2", "5:0", "5:-1e-3", "x:1e-2", "5:fast"):
        with pytest.raises(ValueError, match=r"eval\.lora_lr_by_budget takes steps:lr pairs"):
            get_config("debug", [f"eval.lora_lr_by_budget={bad}"])


def test_the_toy_preset_gives_each_budget_its_measured_best_rate():
    ev = get_config("toy").eval
    assert [ev.per_style_lr(b) for b in ev.optimize_budgets] == [1e-2, 5e-3, 2.5e-3]
    # one rate swept over a preset with a table: refused, not silently outvoted by the table
    with pytest.raises(ValueError, match=r"also set eval\.lora_lr_by_budget= \(empty\)"):
        get_config("toy", ["eval.lora_lr=2e-2"])
    one = get_config("toy", ["eval.lora_lr=2e-2", "eval.lora_lr_by_budget="]).eval
    assert [one.per_style_lr(b) for b in one.optimize_budgets] == [2e-2] * 3
    assert get_config("debug", ["eval.lora_lr=2e-2"]).eval.per_style_lr(5) == 2e-2  # no table: the rate applies


def _samples(n: int = 2, refs: int = 2, size: int = 32) -> list[ValSample]:
    rng = np.random.default_rng(0)
    img = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n * refs + n)]
    return [ValSample(f"v{i}", f"s{i}", PROMPTS[i], "", img[i], img[n + i * refs:n + (i + 1) * refs],
                      PROMPTS[:refs]) for i in range(n)]


def _delta(cond, i: int = 0) -> torch.Tensor:
    lo = cond.loras[i]
    return torch.cat([lo.delta(name).flatten() for name in lo.names])


def test_each_budget_is_the_lora_of_a_run_at_its_own_rate():
    args = (tiny_toy(), _samples())
    kw = {"rank": 2, "image_size": 32, "rows": 2, "seed": 3}
    rates = {2: 3e-2, 3: 3e-2, 5: 1e-2}
    mixed = per_style_conditionings(*args, (5, 2, 3), lr=rates.get, **kw)  # budgets in any order
    assert [c.method for c in mixed] == ["per_style@2", "per_style@3", "per_style@5"]
    assert [c.budget for c in mixed] == [2, 3, 5] and "lr 0.03" in mixed[0].note and "lr 0.01" in mixed[2].note
    fast = per_style_conditionings(*args, (2, 3, 5), lr=3e-2, **kw)
    slow = per_style_conditionings(*args, (2, 3, 5), lr=1e-2, **kw)
    for i in range(len(args[1])):
        assert torch.equal(_delta(mixed[0], i), _delta(fast[0], i))  # 2 and 3 steps: one run at 3e-2
        assert torch.equal(_delta(mixed[1], i), _delta(fast[1], i))
        assert torch.equal(_delta(mixed[2], i), _delta(slow[2], i))  # 5 steps: its own run at 1e-2
        assert not torch.allclose(_delta(mixed[2], i), _delta(fast[2], i))
    assert all(c.wall_s[0] > 0 for c in mixed)


def test_the_evaluation_gives_each_budget_the_configured_rate(debug_run):
    """make_conditionings follows eval.lora_lr_by_budget (the checkpoint's model, the eval settings given)."""
    model = I2L.load(debug_run.run_dir)
    samples = load_val_samples(debug_run.prepared_dir, limit=2)
    ev = dataclasses.replace(model.cfg.eval, optimize_budgets=(2, 4), lora_lr_by_budget=("1:2e-2", "4:5e-3"))
    got = make_conditionings(model, samples, ("per_style",), ev)
    kw = {"rank": model.cfg.predictor.rank, "image_size": model.cfg.backbone.image_size, "rows": ev.per_style_rows,
          "seed": ev.seed, "timesteps": timestep_sampler(model.cfg, model.backbone)}  # the run's law, as evaluated
    (at2,) = per_style_conditionings(model.backbone, samples, (2,), lr=2e-2, **kw)
    (at4,) = per_style_conditionings(model.backbone, samples, (4,), lr=5e-3, **kw)
    assert torch.equal(_delta(got[0]), _delta(at2)) and torch.equal(_delta(got[1]), _delta(at4))
