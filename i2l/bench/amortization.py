"""Amortization: one i2L forward (per style) vs the per-style LoRA optimisation time needed to reach the same
held-out FM loss, measured side by side on the same held-out styles in one run. Goal >= 1000x.
The i2L forward is timed alone (one style, batch of 1) and as mass production runs it (all styles of the run in
one batched forward, time per style); both ratios are reported.

Needs a trained checkpoint and prepared data (`make run` makes both on the toy world).
"""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="data/runs/toy/train", help="training run or checkpoint dir")
    p.add_argument("--data", default="data/prepared/toy", help="prepared data dir (val split + manifest)")
    p.add_argument("--styles", type=int, default=4, help="held-out styles")
    p.add_argument("--max-steps", type=int, default=300, help="most per-style optimisation steps tried")
    p.add_argument("--data-root", default=None, help="data root of the checkpoint's toy models")


def run(args: argparse.Namespace) -> list[dict]:
    from i2l.api import I2L
    from i2l.evaluation import heldout_loss, load_val_samples
    from i2l.images import to_tensor
    from i2l.per_style import optimize_lora

    model = I2L.load(args.checkpoint, data_root=args.data_root)
    cfg, bb = model.cfg, model.backbone
    size, T, S = cfg.backbone.image_size, cfg.eval.fm_timesteps, cfg.eval.fm_noise_seeds
    samples = load_val_samples(args.data, limit=args.styles)
    snaps = tuple(sorted({1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, args.max_steps}
                         & set(range(1, args.max_steps + 1))))
    rows, ratios = [], []
    for i, s in enumerate(samples):
        model.predict_lora(s.refs)  # warm-up
        fwd = []
        for _ in range(5):
            t0 = time.perf_counter()
            lora = model.predict_lora(s.refs)
            fwd.append(time.perf_counter() - t0)
        t_fwd = statistics.median(fwd)
        target = heldout_loss(bb, s, lora, size, T, S, i)
        base = heldout_loss(bb, s, None, size, T, S, i)
        _, curve = optimize_lora(bb, to_tensor(s.refs, size), s.ref_prompts, cfg.predictor.rank, args.max_steps,
                                 seed=i, snapshots=snaps)
        reached = None
        for snap in curve:
            if heldout_loss(bb, s, snap["lora"], size, T, S, i) <= target:
                reached = snap
                break
        wall = reached["wall_s"] if reached else curve[-1]["wall_s"]
        ratio = wall / t_fwd
        ratios.append(ratio)
        rows += [
            {"case": s.style_id, "metric": "i2l_forward_s", "value": t_fwd, "unit": "s"},
            {"case": s.style_id, "metric": "i2l_loss", "value": target, "unit": "fm"},
            {"case": s.style_id, "metric": "base_loss", "value": base, "unit": "fm"},
            {"case": s.style_id, "metric": "per_style_steps_to_match",
             "value": reached["steps"] if reached else float("nan"), "unit": "steps"},
            {"case": s.style_id, "metric": "per_style_s_to_match" if reached else "per_style_s_not_reached",
             "value": wall, "unit": "s"},
            {"case": s.style_id, "metric": "amortization" if reached else "amortization_lower_bound",
             "value": ratio, "unit": "x"},
        ]
    model.predict_loras([s.refs for s in samples])  # warm-up
    batched = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.predict_loras([s.refs for s in samples])
        batched.append((time.perf_counter() - t0) / len(samples))
    t_batched = statistics.median(batched)
    per_style_s = [r["value"] for r in rows if r["metric"].startswith("per_style_s_")]
    med = statistics.median(ratios)
    med_b = statistics.median(w / t_batched for w in per_style_s)
    reached_all = all(r["metric"] == "amortization" for r in rows if r["metric"].startswith("amortization"))
    note = {} if reached_all else {"unit": "x (lower bound: some styles never reached i2L's loss)"}
    rows += [
        {"case": "all", "metric": "i2l_forward_batched_s", "value": t_batched, "unit": "s per style"},
        {"case": "median", "metric": "amortization", "value": med, "unit": "x", **note,
         "goal": ">= 1000", "goal_met": med >= 1000},
        {"case": "median", "metric": "amortization_batched", "value": med_b, "unit": "x", **note,
         "goal": ">= 1000", "goal_met": med_b >= 1000},
    ]
    return rows
