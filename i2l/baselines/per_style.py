"""The per-style LoRA baseline: what i2L amortizes. A LoRA with the same targets and rank is optimised directly
on one style's reference images (prompts = their contents) by flow matching, for S steps. Same file format.
Several styles are optimised side by side as one batch (each with its own LoRA and loss); one style is a batch
of one. Shapes: S styles, N references per style, k rows per style and step, r rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from i2l.backbones.base import Backbone, Cond
from i2l.model.flow_matching import TimestepSampler, fm_backward
from i2l.model.lora import LoRA, zero_lora


def optimize_loras(backbone: Backbone, images: torch.Tensor, prompts: list[list[str]], rank: int, steps: int,
                   *, lr: float, seed: int = 0, snapshots: tuple[int, ...] = (), rows: int = 16,
                   stop: Callable[[dict], bool] | None = None, keep_loras: bool = True,
                   progress: bool = False, timesteps: TimestepSampler | None = None) -> tuple[LoRA, list[dict]]:
    """Optimise one LoRA per style on (images (S, N, 3, H, W), prompts S x N), `rows` of each style's references
    per step. Each style's loss is its own mean, so Adam moves each LoRA as if it were optimised alone.
    Returns the final batched LoRA (S) and, for each step count in `snapshots`, {steps, wall_s, loss, lora (S)}
    measured on the same run (cumulative wall time, not re-runs; loss: mean over styles of this step's loss).
    stop(snapshot) -> True ends the run at that snapshot; the time spent in it is not counted in wall_s.
    keep_loras=False: a snapshot's LoRA is only lent to `stop`, then dropped (a check at every step of a
    real-size LoRA would otherwise keep hundreds of copies). timesteps: how t is drawn (the run's law,
    `i2l.train.step.timestep_sampler`; None: logit-normal)."""
    from tqdm import tqdm

    S, N = images.shape[:2]
    dev = backbone.device
    init = zero_lora(backbone.lora_targets(), rank, backbone.backbone_id)
    A = {k: v.to(dev).repeat(S, 1, 1).requires_grad_(True) for k, v in init.A.items()}  # (S, r, in)
    B = {k: v.to(dev).repeat(S, 1, 1).requires_grad_(True) for k, v in init.B.items()}  # (S, out, r)
    opt = torch.optim.Adam([*A.values(), *B.values()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x_all = backbone.encode_images(images.flatten(0, 1).to(dev))  # (S·N, *latent)
        cond_all: Cond = backbone.encode_prompts([p for ps in prompts for p in ps])  # (S·N, L, E)

    def frozen(meta: dict | None = None) -> LoRA:  # a copy the next Adam step does not change
        return LoRA({k: v.detach().clone() for k, v in A.items()}, {k: v.detach().clone() for k, v in B.items()},
                    backbone.backbone_id, meta or {})

    out, t0, paused, done_steps = [], time.perf_counter(), 0.0, 0
    if 0 in snapshots:
        out.append({"steps": 0, "wall_s": 0.0, **({"lora": frozen()} if keep_loras else {})})
    for step in tqdm(range(1, steps + 1), desc="per-style LoRAs", disable=not progress):
        # each style's rows: its own few references repeated into a batch (more noise/timestep samples per step)
        pick = torch.randint(N, (S, rows), generator=g)
        idx = (torch.arange(S)[:, None] * N + pick).flatten()  # (S·k,)
        loss = fm_backward(backbone, x_all[idx], cond_all.index(idx), _rows_lora(A, B, rows, backbone), opt, g,
                           reduce=lambda per: per.view(S, rows).mean(1).sum(),  # no style's step depends on S
                           timesteps=timesteps)
        opt.step()
        done_steps = step
        if step in snapshots:
            lv = loss.item() / S  # waits for the device's queued work (this step's backward and Adam) first
            t_stop = time.perf_counter()  # the snapshot's copy and check are off the clock
            out.append({"steps": step, "wall_s": t_stop - t0 - paused, "loss": lv, "lora": frozen()})
            done = stop is not None and stop(out[-1])
            paused += time.perf_counter() - t_stop
            if not keep_loras:
                del out[-1]["lora"]
            if done:
                break
    return frozen({"method": "per_style", "steps": done_steps}), out


def _rows_lora(A: dict, B: dict, rows: int, backbone: Backbone) -> LoRA:
    """The LoRA of each of the S·k rows: one style's LoRA shared by its whole batch when S = 1 (the layers'
    plain matmul), else each style's LoRA over its k consecutive rows (`repeat_each`)."""
    if next(iter(A.values())).shape[0] == 1:
        return LoRA({k: v[0] for k, v in A.items()}, {k: v[0] for k, v in B.items()}, backbone.backbone_id)
    return LoRA(A, B, backbone.backbone_id).repeat_each(rows)  # (S, r, in), (S, out, r), each for its k rows


def optimize_lora(backbone: Backbone, images: torch.Tensor, prompts: list[str], rank: int, steps: int,
                  *, lr: float, seed: int = 0, snapshots: tuple[int, ...] = (), batch_size: int = 16,
                  stop: Callable[[dict], bool] | None = None, keep_loras: bool = True,
                  timesteps: TimestepSampler | None = None) -> tuple[LoRA, list[dict]]:
    """One style: optimize_loras on a batch of one, with images (N, 3, H, W) and `batch_size` rows per step.
    Returns the final LoRA and the snapshots (as optimize_loras), their LoRAs unbatched."""
    final, out = optimize_loras(backbone, images[None], [list(prompts)], rank, steps, lr=lr, seed=seed,
                                snapshots=snapshots, rows=batch_size, keep_loras=keep_loras, timesteps=timesteps,
                                stop=None if stop is None else lambda snap: stop(_first(snap)))
    return final[0], [_first(s) for s in out]


def _first(snapshot: dict) -> dict:
    return {**snapshot, "lora": snapshot["lora"][0]} if "lora" in snapshot else snapshot
