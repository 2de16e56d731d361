"""Amortization: one i2L forward (per style) vs the per-style LoRA optimisation time needed to reach the same
held-out FM loss, measured side by side on the same held-out styles in one run. Goal >= 1000x.

The i2L forward is timed alone (one style, batch of 1) and as mass production runs it (all styles of the run in
one batched forward, time per style). The per-style baseline is given its best set-up: it runs at each batch
size in --per-style-batches and the fastest to reach i2L's loss counts (few rows per step are cheap but noisy).
The table also says what the goal asks of i2L's quality on this machine: at t_step seconds per per-style step
and t_fwd per forward, 1000x needs i2L to match per-style optimisation after 1000 * t_fwd / t_step steps.

Needs a trained checkpoint and prepared data (`make run` makes both on the toy world).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

GOAL = 1000.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="data/runs/toy/train", help="training run or checkpoint dir")
    p.add_argument("--data", default="data/prepared/toy", help="prepared data dir (val split + manifest)")
    p.add_argument("--styles", type=int, default=4, help="held-out styles")
    p.add_argument("--max-steps", type=int, default=300, help="most per-style optimisation steps tried")
    p.add_argument("--per-style-batches", default="4,16",
                   help="per-style rows per step to try; the fastest to reach i2L's loss counts")
    p.add_argument("--data-root", default=None, help="data root of the checkpoint's toy models")


def _median_time(fn, rounds: int = 5, warmup: bool = True) -> float:
    if warmup:
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> list[dict]:
    from i2l.api import I2L
    from i2l.evaluation import heldout_loss, load_val_samples
    from i2l.images import to_tensor
    from i2l.per_style import optimize_lora

    model = I2L.load(args.checkpoint, data_root=args.data_root)
    cfg, bb = model.cfg, model.backbone
    size, T, S = cfg.backbone.image_size, cfg.eval.fm_timesteps, cfg.eval.fm_noise_seeds
    samples = load_val_samples(args.data, limit=args.styles)
    batches = [int(b) for b in str(args.per_style_batches).split(",") if b.strip()]
    if not batches or min(batches) < 1:
        raise ValueError(f"--per-style-batches must list rows per step >= 1, e.g. 4,16 (got {args.per_style_batches!r})")
    snaps = tuple(sorted({1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, args.max_steps}
                         & set(range(1, args.max_steps + 1))))
    rows, best_walls, fwd_s, ratios, step_s = [], [], [], [], {b: [] for b in batches}
    for i, s in enumerate(samples):
        lora = model.predict_lora(s.refs)  # also the warm-up of its timing
        t_fwd = _median_time(lambda s=s: model.predict_lora(s.refs), warmup=False)
        fwd_s.append(t_fwd)
        target = heldout_loss(bb, s, lora, size, T, S, i)
        base = heldout_loss(bb, s, None, size, T, S, i)
        rows += [{"case": s.style_id, "metric": "i2l_forward_s", "value": t_fwd, "unit": "s"},
                 {"case": s.style_id, "metric": "i2l_loss", "value": target, "unit": "fm"},
                 {"case": s.style_id, "metric": "base_loss", "value": base, "unit": "fm"}]
        best = None  # (wall_s, rows per step, reached)
        for b in batches:
            hit = []

            def reached(snap, s=s, i=i, hit=hit, target=target):
                hit.append(heldout_loss(bb, s, snap["lora"], size, T, S, i) <= target)
                return hit[-1]

            _, curve = optimize_lora(bb, to_tensor(s.refs, size), s.ref_prompts, cfg.predictor.rank, args.max_steps,
                                     seed=i, snapshots=snaps, batch_size=b, stop=reached)
            last, ok = curve[-1], hit[-1]
            step_s[b].append(last["wall_s"] / last["steps"])
            case, tail = f"{s.style_id}/rows{b}", "to_match" if ok else "not_reached"
            rows += [{"case": case, "metric": f"per_style_steps_{tail}", "value": last["steps"], "unit": "steps"},
                     {"case": case, "metric": f"per_style_s_{tail}", "value": last["wall_s"], "unit": "s"}]
            # a set-up that reaches i2L's loss beats one that does not; then the faster wins
            if best is None or (ok, -last["wall_s"]) > (best[2], -best[0]):
                best = (last["wall_s"], b, ok)
        wall, b, ok = best
        best_walls.append((wall, ok))
        ratios.append(wall / t_fwd)
        rows.append({"case": s.style_id, "metric": "amortization" if ok else "amortization_lower_bound",
                     "value": ratios[-1], "unit": f"x (per-style rows {b})"})
    t_batched = _median_time(lambda: model.predict_loras([s.refs for s in samples])) / len(samples)
    t_alone = statistics.median(fwd_s)
    rows.append({"case": "all", "metric": "i2l_forward_batched_s", "value": t_batched, "unit": "s per style"})
    for b in batches:  # what the goal asks of i2L's quality at this machine's per-style step cost
        t_step = statistics.median(step_s[b])
        rows.append({"case": f"rows{b}", "metric": "per_style_step_s", "value": t_step, "unit": "s"})
        rows += [{"case": f"rows{b}/{how}", "metric": "goal_needs_steps", "value": math.ceil(GOAL * t / t_step),
                  "unit": "steps"} for how, t in (("alone", t_alone), ("batched", t_batched))]
    all_reached = all(ok for _, ok in best_walls)
    unit = "x" if all_reached else "x (lower bound: some styles never reached i2L's loss)"
    for metric, ratio in (("amortization", statistics.median(ratios)),
                          ("amortization_batched", statistics.median(w for w, _ in best_walls) / t_batched)):
        rows.append({"case": "median", "metric": metric, "value": ratio, "unit": unit, "goal": f">= {GOAL:g}",
                     "goal_met": all_reached and ratio >= GOAL})
    return rows
