"""The training step all loops share: the lr schedule is today's formula bit for bit (also after a resume),
clipping clips, backward does not accumulate, records and the loss summary say what happened."""

import json
import math

import pytest
import torch

from i2l.config import get_config
from i2l.train.curve import loss_summary
from i2l.train.step import TrainStep, WarmupCosine, lr_at, step_generator, step_seed


def _reference_lr(step: int, total: int, base: float, warmup: int) -> float:
    """The schedule as the loops computed it by hand before the helper (frozen here on purpose)."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _schedules(preset: str) -> list[tuple[int, float, int]]:
    """(total steps, base lr, warmup) of every loop that uses the warmup + cosine schedule."""
    cfg = get_config(preset)
    t, bb_steps = cfg.train, cfg.train.backbone_steps
    return [(t.steps, t.lr, t.warmup),  # predictor and adapter
            (t.steps, cfg.eval.mean_lora_lr, t.warmup),  # mean-LoRA
            (bb_steps, t.backbone_lr, max(1, bb_steps // 20))]  # toy backbone


def _sgd(lr: float, groups: int = 1) -> torch.optim.SGD:
    return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(groups)], lr=lr)


def _lrs_used(opt, sched, steps: int) -> list[list[float]]:
    """The lr of every group at each optimizer step, advancing the schedule as TrainStep does."""
    used = []
    for _ in range(steps):
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("preset", ["debug", "toy"])
def test_scheduler_lr_equals_the_formula_bit_for_bit(preset):
    for total, base, warmup in _schedules(preset):
        opt = _sgd(base, groups=2)
        used = _lrs_used(opt, WarmupCosine(opt, total, warmup), total)
        want = [_reference_lr(s, total, base, warmup) for s in range(total)]
        assert [u[0] for u in used] == want, (preset, total, base, warmup)
        assert [u[1] for u in used] == want
        assert [lr_at(s, total, base, warmup) for s in range(total)] == want


@pytest.mark.parametrize("preset", ["debug", "toy"])
def test_a_resumed_scheduler_continues_where_it_stopped(preset):
    """Only the optimizer's state is saved (through JSON, as checkpoints store param_groups); a scheduler built
    at the resume step gives the uninterrupted run's lrs for the rest of the run."""
    total, base, warmup = _schedules(preset)[0]
    for start in (1, warmup, total // 2, total - 1):
        opt = _sgd(base)
        sched = WarmupCosine(opt, total, warmup)
        straight = _lrs_used(opt, sched, total)
        opt = _sgd(base)
        sched = WarmupCosine(opt, total, warmup)
        _lrs_used(opt, sched, start)
        saved = json.loads(json.dumps(opt.state_dict()))
        saved["state"] = {int(k): v for k, v in saved["state"].items()}
        again = _sgd(0.5)  # another lr: the resumed one must come from the saved state, not from here
        again.load_state_dict(saved)
        resumed = _lrs_used(again, WarmupCosine(again, total, warmup, start=start), total - start)
        assert resumed == straight[start:], (preset, start)


def test_clipping_bounds_the_update_and_records_the_norm_before_it():
    w = torch.zeros(2, requires_grad=True)
    grad = torch.tensor([3.0, 4.0])  # norm 5
    clipped = TrainStep(torch.optim.SGD([w], lr=1.0), grad_clip=1.0)
    rec = clipped.step(clipped.backward((w * grad).sum()))
    assert rec["grad_norm"] == pytest.approx(5.0)
    assert torch.allclose(w.detach(), torch.tensor([-0.6, -0.8]))  # the unit-norm gradient

    v = torch.zeros(2, requires_grad=True)
    free = TrainStep(torch.optim.SGD([v], lr=1.0))  # no clipping: the full gradient, no norm recorded
    rec = free.step(free.backward((v * grad).sum()))
    assert "grad_norm" not in rec and torch.equal(v.detach(), -grad)

    u = torch.zeros(2, requires_grad=True)
    loose = TrainStep(torch.optim.SGD([u], lr=1.0), grad_clip=10.0)  # under the limit: untouched
    loose.step(loose.backward((u * grad).sum()))
    assert torch.equal(u.detach(), -grad)


def test_clipping_covers_only_the_given_params():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    trainer = TrainStep(torch.optim.SGD([a, b], lr=1.0), grad_clip=1.0, params=[a])
    trainer.step(trainer.backward(a.sum() * 3 + b.sum() * 3))
    assert a.item() == pytest.approx(-1.0) and b.item() == pytest.approx(-3.0)


def test_backward_starts_from_zero_gradients():
    w = torch.zeros(1, requires_grad=True)
    trainer = TrainStep(torch.optim.SGD([w], lr=1.0))
    for _ in range(2):
        trainer.step(trainer.backward(w.sum() * 2))
    assert w.item() == pytest.approx(-4.0)  # two updates of -2, not -2 then -4


def test_records_number_steps_done_and_carry_the_lr_the_update_used():
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    sched = WarmupCosine(opt, total=10, warmup=4)
    _lrs_used(opt, sched, 3)
    trainer = TrainStep(opt, schedule=sched, start=3, curve=[{"loss": 9.0}])
    before = w.item()
    rec = trainer.step(trainer.backward(w.sum()), extra=1.5)
    assert rec == {"step": 4, "loss": 0.0, "lr": lr_at(3, 10, 1.0, 4), "extra": 1.5}
    assert w.item() == pytest.approx(before - rec["lr"])  # SGD moved by exactly that lr
    assert opt.param_groups[0]["lr"] == lr_at(4, 10, 1.0, 4)  # and the schedule moved on
    assert trainer.curve == [{"loss": 9.0}, rec] and trainer.done == 4


def test_summary_is_the_mean_of_the_first_and_last_k_losses():
    curve = [{"loss": float(i)} for i in range(50)]
    assert loss_summary(curve) == {"first_loss": 9.5, "last_loss": 39.5}  # means of 0..19 and 30..49
    assert loss_summary(curve, first=1, last=10) == {"first_loss": 0.0, "last_loss": 44.5}
    assert loss_summary(curve[:3]) == {"first_loss": 1.0, "last_loss": 1.0}  # shorter than k: all of it
    assert loss_summary([]) == {"first_loss": None, "last_loss": None}
    trainer = TrainStep(_sgd(0.1), curve=curve)
    assert trainer.summary(10, 10) == {"first_loss": 4.5, "last_loss": 44.5}


def test_step_seed_is_fixed_by_seed_step_and_rank():
    assert step_seed(7, 3, 1) == 7 * 1_000_003 + 3 * 1009 + 1  # the formula every checkpointed run was made with
    assert len({step_seed(0, s, r) for s in range(1000) for r in range(8)}) == 8000
    a, b = step_generator(7, 3, 1), torch.Generator().manual_seed(step_seed(7, 3, 1))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
