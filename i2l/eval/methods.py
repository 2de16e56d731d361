"""The methods compared on held-out samples as per-sample conditioning, with the wall time to make one style's:
base, mean-LoRA, per-style LoRAs at step budgets, i2L from 1 / 4 references, adapter tokens (make_conditionings:
the one list the evaluation stage and `i2l eval-loss` use); and each method's held-out FM loss.
Shapes: S samples, N references, k rows per style and step, r rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from i2l.backbones.base import Backbone
from i2l.baselines.per_style import optimize_loras
from i2l.config import EvalConfig
from i2l.data.images import to_tensor
from i2l.eval.heldout_loss import ValSample, heldout_loss_by_t
from i2l.model.flow_matching import TimestepSampler
from i2l.model.lora import LoRA
from i2l.train.step import timestep_sampler

FAMILIES = ("base", "mean_lora", "per_style", "i2l", "adapter")  # the method families, in table order


@dataclass
class Conditioning:
    """One method's conditioning for every sample: LoRAs (None = base model) or adapter tokens."""

    method: str
    loras: list[LoRA | None] = field(default_factory=list)  # one per sample; empty for the adapter
    extra: torch.Tensor | None = None  # adapter context tokens (S, M, E)
    wall_s: list[float] = field(default_factory=list)  # seconds to make each sample's conditioning
    asym: bool = False  # negative CFG branch: the gray-image LoRA (paper §3.4) instead of the same LoRA
    n_refs: int = 0  # references the method sees (0: style-free)
    budget: int = 0  # per-style optimisation steps
    note: str = ""
    lora_of: str = ""  # the method whose LoRAs these are (asym variants reuse the plain ones)

    @property
    def mean_wall_s(self) -> float:
        return sum(self.wall_s) / len(self.wall_s) if self.wall_s else 0.0


def base_conditioning(n: int) -> Conditioning:
    return Conditioning("base", loras=[None] * n, wall_s=[0.0] * n, note="backbone alone")


def mean_lora_conditioning(lora: LoRA, n: int, train_s: float) -> Conditioning:
    return Conditioning("mean_lora", loras=[lora] * n, wall_s=[0.0] * n,
                        note=f"one LoRA for all styles, trained once in {train_s:.0f}s")


def i2l_ref_counts(samples: list[ValSample]) -> tuple[int, ...]:
    """i2L is evaluated from 1 and from 4 references, capped by the fewest any sample holds."""
    return 1, min(4, min(len(s.refs) for s in samples))


def i2l_conditionings(model, samples: list[ValSample], ref_counts: tuple[int, ...] = (1, 4),
                      progress: bool = False) -> list[Conditioning]:
    """i2L LoRAs from the first k references of each sample, one forward per style (timed alone, as a user
    would run it), each with plain CFG and with asymmetric (gray-image) CFG."""
    from tqdm import tqdm

    model.gray_lora()  # made once up front: not part of any style's time
    out = []
    for k in dict.fromkeys(ref_counts):  # (1, 1) when samples hold one reference: one method, not two copies
        model.predict_lora(samples[0].refs[:k])  # warm-up: first-call allocations are no style's time
        loras, walls = [], []
        for s in tqdm(samples, desc=f"i2L {k}-ref LoRAs", disable=not progress):
            t0 = time.perf_counter()
            loras.append(model.predict_lora(s.refs[:k]))
            walls.append(time.perf_counter() - t0)
        plain = Conditioning(f"i2l_{k}ref", loras=loras, wall_s=walls, n_refs=k, note="one predictor forward")
        asym = Conditioning(f"i2l_{k}ref_asym", loras=loras, wall_s=walls, n_refs=k, asym=True,
                            note="one predictor forward; gray-image LoRA on the negative branch",
                            lora_of=plain.method)
        out += [plain, asym]
    return out


def per_style_conditionings(backbone: Backbone, samples: list[ValSample], budgets: tuple[int, ...], rank: int,
                            image_size: int, lr: float | Callable[[int], float], rows: int, seed: int = 0,
                            progress: bool = False, timesteps: TimestepSampler | None = None) -> list[Conditioning]:
    """Per-style LoRAs at each step budget, optimised on each sample's references (prompts = their contents).
    lr: one Adam rate for every budget, or budget -> rate (EvalConfig.per_style_lr): budgets of one rate share one
    run, snapshotted at each of them. Quality: all styles side by side (i2l.baselines.per_style.optimize_loras).
    Wall time: the first style optimised alone (a batch of one, same rows per step), as one user would wait for
    it, at each budget."""
    if not budgets:
        return []
    rate = lr if callable(lr) else (lambda b: lr)
    by_rate: dict[float, list[int]] = {}
    for b in sorted(set(budgets)):
        by_rate.setdefault(float(rate(b)), []).append(b)
    N = min(len(s.refs) for s in samples)
    images = torch.stack([to_tensor(s.refs[:N], image_size) for s in samples])  # (S, N, 3, H, W)
    prompts = [s.ref_prompts[:N] for s in samples]
    out = {}
    for r, group in by_rate.items():  # each run goes as far as its largest budget
        group = tuple(group)
        _, snaps = optimize_loras(backbone, images, prompts, rank, group[-1], lr=r, seed=seed, snapshots=group,
                                  rows=rows, progress=progress, timesteps=timesteps)
        _, timed = optimize_loras(backbone, images[:1], prompts[:1], rank, group[-1], lr=r, seed=seed,
                                  snapshots=group, rows=rows, keep_loras=False, timesteps=timesteps)
        wall = {t["steps"]: t["wall_s"] for t in timed}
        for t in snaps:
            b = t["steps"]
            out[b] = Conditioning(f"per_style@{b}", loras=[lo.detach().to("cpu") for lo in t["lora"].unbind()],
                                  wall_s=[wall[b]] * len(samples), n_refs=N, budget=b,
                                  note=f"{b} Adam steps (lr {r:g}) x {rows} rows on the {N} references; time of "
                                       f"one style alone")
    return [out[b] for b in sorted(out)]


def adapter_conditioning(adapter, encoder, samples: list[ValSample], n_refs: int = 4,
                         progress: bool = False) -> Conditioning:
    """Adapter context tokens from each sample's first n_refs references (one encoder + projector forward)."""
    from tqdm import tqdm

    from i2l.baselines.adapter import adapter_tokens

    extras, walls = [], []
    with torch.no_grad():
        size = encoder.cfg.image_size
        adapter_tokens(adapter, encoder, to_tensor(samples[0].refs[:n_refs], size))  # warm-up, untimed
        for s in tqdm(samples, desc="adapter tokens", disable=not progress):
            t0 = time.perf_counter()
            refs = to_tensor(s.refs[:n_refs], size).to(encoder.device)  # (N, 3, h, w)
            extras.append(adapter_tokens(adapter, encoder, refs)[0].cpu())  # (M, E)
            walls.append(time.perf_counter() - t0)
    return Conditioning("adapter", extra=torch.stack(extras), wall_s=walls, n_refs=n_refs,
                        note="frozen encoder tokens -> extra context tokens, one forward")


def heldout_losses(model, samples: list[ValSample], conds: list[Conditioning], ev: EvalConfig,
                   progress: bool = False) -> list[dict]:
    """Rows {method, style_id, n_refs, steps, wall_s, loss, loss_by_t} on i2l.eval.heldout_loss's fixed grid
    (ev.fm_timesteps x ev.fm_noise_seeds; loss_by_t: the mean at each timestep of the grid), for each method's own
    conditioning (CFG plays no part, so asym variants are left out), plus the gray-image LoRA and a wrong style's
    i2L LoRA as sanity checks."""
    from tqdm import tqdm

    from i2l.baselines.adapter import ConditionedBackbone

    bb = model.backbone
    size, T, S = model.cfg.backbone.image_size, ev.fm_timesteps, ev.fm_noise_seeds
    i2l = [c for c in conds if c.method.startswith("i2l") and not c.asym]
    rows = []
    for i, s in enumerate(tqdm(samples, desc="held-out FM loss", disable=not progress)):
        def add(method, n_refs, steps, wall, lora=None, backbone=bb, s=s, i=i):
            loss, by_t = heldout_loss_by_t(backbone, s, lora, size, T, S, i)
            rows.append({"method": method, "style_id": s.style_id, "n_refs": n_refs, "steps": steps,
                         "wall_s": wall, "loss": loss, "loss_by_t": by_t})

        for c in conds:
            if c.asym:
                continue
            if c.extra is not None:
                add(c.method, c.n_refs, 0, c.wall_s[i], backbone=ConditionedBackbone(bb, c.extra[i:i + 1]))
            else:
                add(c.method, c.n_refs, c.budget, c.wall_s[i], lora=c.loras[i])
        if i2l:
            add("gray_lora", 0, 0, 0.0, lora=model.gray_lora())
            if len(samples) > 1:  # the most-references i2L LoRA of the next sample's style
                add("i2l_wrong_style", i2l[-1].n_refs, 0, 0.0, lora=i2l[-1].loras[(i + 1) % len(samples)])
    return rows


def make_conditionings(model, samples: list[ValSample], families: tuple[str, ...], ev: EvalConfig,
                       baseline: Callable[[str], tuple] | None = None, progress: bool = False) -> list[Conditioning]:
    """The conditionings of the method `families` (base, mean_lora, per_style, i2l, adapter), in that order,
    with the eval settings `ev` (per-style budgets, lr, rows and seed). The model gives the rank and image size.
    baseline(kind) -> (trained mean-LoRA or adapter, its info): needed for those two families only."""
    cfg, n = model.cfg, len(samples)
    if {"mean_lora", "adapter"} & set(families) and baseline is None:
        raise ValueError("the mean_lora and adapter families need their trained baseline: pass `baseline`")
    conds = []
    if "base" in families:
        conds.append(base_conditioning(n))
    if "mean_lora" in families:
        lora, info = baseline("mean_lora")
        conds.append(mean_lora_conditioning(lora, n, info["seconds"]))
    if "per_style" in families:
        # t drawn by the predictor's law (train.timesteps): every method trains on the same timesteps
        conds += per_style_conditionings(model.backbone, samples, ev.optimize_budgets, cfg.predictor.rank,
                                         cfg.backbone.image_size, ev.per_style_lr, ev.per_style_rows, ev.seed, progress,
                                         timestep_sampler(cfg, model.backbone))
    if "i2l" in families:
        conds += i2l_conditionings(model, samples, i2l_ref_counts(samples), progress)
    if "adapter" in families:
        adapter, _ = baseline("adapter")
        conds.append(adapter_conditioning(adapter, model.encoder, samples, 4, progress))
    return conds
