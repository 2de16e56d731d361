"""Training-step cost: one i2L step (encoder + predictor + FM loss through the frozen backbone + backward +
AdamW) vs one plain per-style LoRA step on the same backbone and batch. Interleaved rounds, medians.
The i2L step is timed as training runs it (G = train.targets_per_lora targets share one predicted LoRA) and
with one LoRA per target (G = 1). Goal: i2L / per-style <= 1.3.

Any preset: models are built at the preset's full size with random weights (speed only), on a GPU when there is
one, with bf16 autocast and gradient checkpointing as training uses there (`--preset klein4b` times FLUX.2-klein
4B + SigLIP2 so400m without reading a checkpoint)."""

from __future__ import annotations

import argparse
import statistics


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="config preset (models are freshly initialised: speed only)")
    p.add_argument("--batch", type=int, default=None, help="targets per step (default: train.batch_size)")
    p.add_argument("--refs", type=int, default=4, help="references per sample")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set predictor.rank=16 (repeatable)")


def run(args: argparse.Namespace) -> list[dict]:
    import torch  # here, not at import: every bench module is imported to build `i2l --help`

    from i2l.bench._steps import Steps, interleaved, median_ratio, setup_rows

    if args.threads:
        torch.set_num_threads(args.threads)
    st = Steps.build(args.preset, args.device, args.overrides)
    B = args.batch or st.cfg.train.batch_size
    G = max(1, min(st.cfg.train.targets_per_lora, B))
    data = st.batch(B, args.refs, styles=B)
    opt_i2l = torch.optim.AdamW(st.pred.parameters(), lr=1e-4)
    A, Bm = st.lora_params()
    opt_lora = torch.optim.Adam([*A.values(), *Bm.values()], lr=1e-4)
    cases = {f"i2l_step_G{G}": lambda: st.i2l_step(data, opt_i2l, G),
             "per_style_lora_step": lambda: st.lora_step(data, A, Bm, opt_lora)}
    rows = []
    if G != 1:  # for comparison: one LoRA per target, which may not fit in memory where sharing does
        cases["i2l_step_G1"] = lambda: st.i2l_step(data, opt_i2l, 1)
    try:
        times = interleaved(cases, args.rounds, args.warmup)
    except torch.OutOfMemoryError:
        if G == 1:
            raise
        times = None  # retried below, outside this block: its traceback holds the failed step's activations
    if times is None:
        del cases["i2l_step_G1"]  # time the goal's cases without it
        st.free(opt_i2l)
        rows.append({"case": "i2l_step_G1", "metric": "out_of_memory", "value": 1,
                     "unit": "not timed: one LoRA per target does not fit"})
        times = interleaved(cases, args.rounds, args.warmup)
    rows += [{"case": k, "metric": "median_ms", "value": 1000 * statistics.median(v), "unit": "ms"}
             for k, v in times.items()]
    for k, ts in times.items():
        if k.startswith("i2l"):
            ratio = median_ratio(ts, times["per_style_lora_step"])
            goal = {"goal": "<= 1.3", "goal_met": ratio <= 1.3} if k == f"i2l_step_G{G}" else {}
            rows.append({"case": f"{k}/per_style_lora_step", "metric": "ratio", "value": ratio, "unit": "x", **goal})
    rows += setup_rows(st, B, args.refs)
    return rows
