"""Training-step cost: one i2L step (encoder + predictor + FM loss through the frozen backbone + backward +
AdamW) vs one plain per-style LoRA step on the same backbone and batch. Interleaved rounds, medians.
The i2L step is timed as training runs it (G = train.targets_per_lora targets share one predicted LoRA) and
with one LoRA per target (G = 1). Goal: i2L / per-style <= 1.3, judged like for like: both steps with gradient
checkpointing (as training runs on a GPU) and, where they fit, both without (the per-style step's best set-up).

Any preset: models are built at the preset's full size with random weights (speed only), on a GPU when there is
one, with bf16 autocast and gradient checkpointing as training uses there (`--preset klein4b` times FLUX.2-klein
4B + SigLIP2 so400m without reading a checkpoint). Stored cases start with the preset (+ a hash of the --set
overrides), so that one set-up's figures never replace another's."""

from __future__ import annotations

import argparse
import statistics

from i2l.bench import judged, torch_threads

GOAL = 1.3
NO_CKPT = "_no_ckpt"  # suffix of the cases timed without gradient checkpointing


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
    with torch_threads(args.threads):  # the caller gets its own thread count back
        return _measure(args)


def _measure(args: argparse.Namespace) -> list[dict]:
    import torch  # here, not at import: every bench module is imported to build `i2l --help`

    from i2l.bench._steps import Steps, peak_rows, setup_rows, tag_rows
    from i2l.bench._timing import interleaved, median_ratio

    st = Steps.build(args.preset, args.device, args.overrides)
    B = args.batch or st.cfg.train.batch_size
    G = max(1, min(st.cfg.train.targets_per_lora, B))
    data = st.batch(B, args.refs, styles=B)
    opt_i2l = torch.optim.AdamW(st.pred.parameters(), lr=1e-4)
    A, Bm = st.lora_params()
    opt_lora = torch.optim.Adam([*A.values(), *Bm.values()], lr=1e-4)
    goal_case, ckpt = f"i2l_step_G{G}", st.checkpointing  # a CPU run never checkpoints: one set-up only
    steps = {goal_case: (lambda: st.i2l_step(data, opt_i2l, G), opt_i2l),
             "per_style_lora_step": (lambda: st.lora_step(data, A, Bm, opt_lora), opt_lora)}
    cases = {k: fn for k, (fn, _) in steps.items()}
    rows = []
    if ckpt:  # the same two steps without recomputation, where memory allows
        st.set_checkpointing(False)
        for k, (fn, opt) in steps.items():
            if st.fits(fn, opt):
                cases[k + NO_CKPT] = fn
            else:
                rows.append({"case": k + NO_CKPT, "metric": "out_of_memory", "value": 1,
                             "unit": "not timed: does not fit without gradient checkpointing"})
    if G != 1:  # for comparison: one LoRA per target, which may not fit in memory where sharing does
        cases["i2l_step_G1"] = lambda: st.i2l_step(data, opt_i2l, 1)

    def before(name: str) -> None:  # untimed: each case runs in its own set-up
        if ckpt:
            st.set_checkpointing(not name.endswith(NO_CKPT))

    try:
        times = interleaved(cases, args.rounds, args.warmup, st.peaks, before)
    except torch.OutOfMemoryError:
        if G == 1:
            raise
        times = None  # retried below, outside this block: its traceback holds the failed step's activations
    if times is None:
        del cases["i2l_step_G1"]  # time the goal's cases without it
        st.free(opt_i2l)
        rows.append({"case": "i2l_step_G1", "metric": "out_of_memory", "value": 1,
                     "unit": "not timed: one LoRA per target does not fit"})
        times = interleaved(cases, args.rounds, args.warmup, st.peaks, before)
    rows += [{"case": k, "metric": "median_ms", "value": 1000 * statistics.median(v), "unit": "ms"}
             for k, v in times.items()]
    setup = {"": "both with gradient checkpointing, as training runs" if ckpt else "no gradient checkpointing",
             NO_CKPT: "neither with gradient checkpointing"}
    for k, ts in times.items():
        if k.startswith("i2l"):
            suffix = NO_CKPT if k.endswith(NO_CKPT) else ""
            den = "per_style_lora_step" + suffix
            if den not in times:  # the per-style step did not fit this way: no like-for-like ratio
                continue
            ratio = median_ratio(ts, times[den])
            goal = ("<=", GOAL) if k == goal_case + suffix else None
            rows.append({"case": f"{k}/{den}", "metric": "ratio", "value": ratio, "unit": f"x ({setup[suffix]})",
                         **judged(ratio, goal)})
    return tag_rows(rows + peak_rows(st) + setup_rows(st, B, args.refs), args.preset, args.overrides)

