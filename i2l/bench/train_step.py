"""Training-step cost: one i2L step (encoder + predictor + FM loss through the frozen backbone + backward +
AdamW) vs one plain per-style LoRA step on the same backbone and batch. Interleaved rounds, medians.
The i2L step is timed as training runs it (G = train.targets_per_lora targets share one predicted LoRA) and
with one LoRA per target (G = 1). Goal: i2L / per-style <= 1.3."""

from __future__ import annotations

import argparse
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="config preset (models are freshly initialised: speed only)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: train.batch_size)")
    p.add_argument("--refs", type=int, default=4, help="references per sample")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from i2l.backbones.toy import build_vocab, new_toy_backbone
    from i2l.config import get_config
    from i2l.encoder import new_toy_encoder
    from i2l.flow_matching import fm_loss
    from i2l.lora import LoRA, zero_lora
    from i2l.predictor import I2LPredictor, predict_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_config(args.preset)
    if cfg.backbone.kind != "toy":
        raise ValueError("bench train-step times the toy backbone (fresh weights); use --preset toy or debug")
    B = args.batch or cfg.train.batch_size
    bb = new_toy_backbone(cfg.backbone, build_vocab(["one small circle at the top left"])).freeze()
    enc = new_toy_encoder(cfg.encoder)
    pred = I2LPredictor(cfg.predictor, bb.lora_targets(), enc.dim, bb.backbone_id)
    opt_i2l = torch.optim.AdamW(pred.parameters(), lr=1e-4)
    init = zero_lora(bb.lora_targets(), cfg.predictor.rank, bb.backbone_id)
    A = {k: v.clone().requires_grad_(True) for k, v in init.A.items()}
    Bm = {k: (v + 0.01).requires_grad_(True) for k, v in init.B.items()}
    opt_lora = torch.optim.Adam([*A.values(), *Bm.values()], lr=1e-4)
    x1 = torch.rand(B, 3, cfg.backbone.image_size, cfg.backbone.image_size) * 2 - 1
    refs = torch.rand(B, args.refs, 3, cfg.encoder.image_size, cfg.encoder.image_size) * 2 - 1
    prompts = ["one small circle at the top left"] * B
    G = max(1, min(cfg.train.targets_per_lora, B))

    def step_i2l(g: int):
        cond = bb.encode_prompts(prompts)
        owner = torch.arange(B) // g  # (B,) which predicted LoRA each target uses
        lora = predict_lora(pred, enc, refs[: int(owner[-1]) + 1]).take(owner)
        with bb.lora_adapter.use(lora):
            loss = fm_loss(bb, x1, cond, lora)
            opt_i2l.zero_grad()
            loss.backward()
        opt_i2l.step()

    def step_lora():
        cond = bb.encode_prompts(prompts)
        lora = LoRA(A, Bm, bb.backbone_id)
        with bb.lora_adapter.use(lora):
            loss = fm_loss(bb, x1, cond, lora)
            opt_lora.zero_grad()
            loss.backward()
        opt_lora.step()

    cases = {f"i2l_step_G{G}": lambda: step_i2l(G), "per_style_lora_step": step_lora}
    if G != 1:
        cases["i2l_step_G1"] = lambda: step_i2l(1)
    times = {k: [] for k in cases}
    for r in range(args.warmup + args.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    rows = [{"case": k, "metric": "median_ms", "value": 1000 * statistics.median(v), "unit": "ms"}
            for k, v in times.items()]
    for k, ts in times.items():
        if k.startswith("i2l"):  # ratio per interleaved round, then the median: robust to machine noise
            ratio = statistics.median([a / b for a, b in zip(ts, times["per_style_lora_step"])])
            goal = {"goal": "<= 1.3", "goal_met": ratio <= 1.3} if k == f"i2l_step_G{G}" else {}
            rows.append({"case": f"{k}/per_style_lora_step", "metric": "ratio", "value": ratio, "unit": "x", **goal})
    return rows
