"""Benchmark of asymmetric LoRA guidance: i2l's sampler runs both CFG branches of B samples, each sample with its own
style LoRA and the gray LoRA on its negative branch, in either arrangement: (asymmetric) ONE forward of 2B rows per
step, or (asymmetric_split) two forwards of B rows, the gray LoRA applied as one shared matrix. Timed against
(plain) plain CFG with one LoRA shared by the whole batch, same batch (goal: asymmetric <= 1.05x plain), against
two passes per step that load and clear a LoRA around each branch as the authors' release does, (two_pass_batch) with
the same batch, and (two_pass_per_sample) one sample at a time, as one loaded LoRA per model forces; and, as the
evaluation samples its methods, with each row's own LoRA on both branches (same_lora / same_lora_split).
The `auto` rows say which arrangement the sampler picks on this device (`cfg_passes_for`) and whether that was the
faster one here.

Any preset: the toy presets time their toy backbone; a real one (`--preset klein4b`) is built at its published size
with random weights and random prompt embeddings (speed only), as `i2l bench train-step` builds it.

Interleaved rounds after warmup, medians. On a CPU the ratios use process CPU time, which a shared machine's other
processes disturb far less than the wall clock (on an idle machine both agree); on a GPU, wall time with the device
synchronised after each call. `python -m i2l.bench.cfg`.
"""

from __future__ import annotations

import argparse
import statistics

from i2l.bench import format_rows, judged, torch_threads
from i2l.bench._timing import interleaved

GOALS = {"asymmetric/plain": ("<=", 1.05)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy",
                   help="config preset whose backbone is timed (default: toy; a real preset: random weights)")
    p.add_argument("--batch", type=int, default=8, help="samples per batch (B); each step runs 2B rows")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per timed call")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's predictor.rank)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each runs every case once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set backbone.image_size=512 (repeatable)")


def _load(lora):
    """What loading a LoRA into a model costs at the least: its matrices copied into the layers' parameters."""
    from i2l.model.lora import LoRA

    return LoRA({k: v.clone() for k, v in lora.A.items()}, {k: v.clone() for k, v in lora.B.items()}, lora.backbone)


def sample_two_pass(bb, cond, neg_cond, loras: list, gray, guidance: float, steps: int, noise, per_sample: bool):
    """Reference CFG with separate branch forwards: per step, load the style LoRA, run the positive branch, clear it,
    load the gray LoRA, run the negative branch, clear it. per_sample: one sample at a time (one LoRA per model)."""
    import torch

    from i2l.model.lora import LoRA

    n = len(cond)
    groups = [[i] for i in range(n)] if per_sample else [list(range(n))]
    x = noise.clone()
    ts = bb.sampling_schedule(steps, tuple(x.shape[1:])).to(x.device)  # the grid `sample` steps on
    for s in range(steps):
        t, dt = ts[s], ts[s + 1] - ts[s]
        v = torch.empty_like(x)
        for idx in groups:
            pos = _load(loras[idx[0]] if per_sample else LoRA.stack([loras[i] for i in idx]))
            neg = _load(gray)  # one LoRA shared by the group's rows
            xi, ti = x[idx], t.expand(len(idx)).to(x.dtype)
            v_pos = bb.velocity(xi, ti, cond.index(idx), pos)  # (b, *latent)
            v_neg = bb.velocity(xi, ti, neg_cond.index(idx), neg)
            v[idx] = v_neg + guidance * (v_pos - v_neg)
        x = x + dt * v
    return x


def run(args: argparse.Namespace) -> list[dict]:
    with torch_threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from i2l.backbones.base import Cond
    from i2l.backbones.random_init import random_backbone, random_cond
    from i2l.config import get_config
    from i2l.infer.guidance import cfg_passes_for, sample
    from i2l.model.lora import LoRA
    from i2l.toy.backbone import new_toy_backbone

    cfg = get_config(args.preset, args.overrides)
    dev = torch.device(args.device)
    n, rank, steps, s = args.batch, args.rank or cfg.predictor.rank, args.steps, cfg.eval.guidance
    words = ["one", "two", "small", "large", "circle", "square", "star", "triangle", "at", "the", "top", "bottom",
             "left", "right", "in", "middle"]
    prompts = [" ".join(words[i % 6: i % 6 + 5]) for i in range(n)]
    g = torch.Generator().manual_seed(args.seed)
    if cfg.backbone.kind == "toy":
        bb = new_toy_backbone(cfg.backbone, ["<pad>", "<unk>", *words], seed=args.seed).freeze().to(dev)
        cond, neg_cond = bb.encode_prompts(prompts), bb.encode_prompts([""] * n)
    else:  # the preset's architecture at its size, random weights; prompts as random embeddings of the real width
        bb = random_backbone(cfg, dev, seed=args.seed)
        cond, neg_cond = random_cond(bb, prompts, g), random_cond(bb, [""] * n, g)

    def random_lora(scale=0.05):
        return LoRA({k: torch.randn(rank, i, generator=g) * scale for k, (i, o) in bb.lora_targets().items()},
                    {k: torch.randn(o, rank, generator=g) * scale for k, (i, o) in bb.lora_targets().items()},
                    bb.backbone_id).to(dev)

    styles, gray, shared = [random_lora() for _ in range(n)], random_lora(), random_lora()
    noise = torch.randn(n, *bb.latent_shape(cfg.backbone.image_size), generator=g).to(dev)  # (B, *latent)
    pos = LoRA.stack(styles)  # (B, ...) one LoRA per sample

    def plain():  # one LoRA for every row of both branches: what a pipeline with one loaded LoRA does
        both = Cond.cat([cond, neg_cond])
        x, ts = noise.clone(), bb.sampling_schedule(steps, tuple(noise.shape[1:])).to(dev)
        for i in range(steps):
            v = bb.velocity(torch.cat([x, x]), ts[i].expand(2 * n), both, shared)  # (2B, *latent)
            x = x + (ts[i + 1] - ts[i]) * (v[n:] + s * (v[:n] - v[n:]))
        return x

    def synced(fn):  # a GPU call is timed to its end, not to its last launch
        return (lambda: (fn(), torch.cuda.synchronize())[0]) if dev.type == "cuda" else fn

    cases = {
        "plain": plain,
        "asymmetric": lambda: sample(bb, cond, neg_cond, pos, gray, s, steps, noise=noise, passes="joint"),
        "asymmetric_split": lambda: sample(bb, cond, neg_cond, pos, gray, s, steps, noise=noise, passes="split"),
        "same_lora": lambda: sample(bb, cond, neg_cond, pos, pos, s, steps, noise=noise, passes="joint"),
        "same_lora_split": lambda: sample(bb, cond, neg_cond, pos, pos, s, steps, noise=noise, passes="split"),
        "two_pass_batch": lambda: sample_two_pass(bb, cond, neg_cond, styles, gray, s, steps, noise, False),
        "two_pass_per_sample": lambda: sample_two_pass(bb, cond, neg_cond, styles, gray, s, steps, noise, True),
    }
    cases = {k: synced(f) for k, f in cases.items()}
    with torch.no_grad():
        outs = {k: f() for k, f in cases.items()}
        cpu: dict[str, list[float]] = {}
        wall = interleaved(cases, args.rounds, args.warmup, cpu=cpu)
    on_cpu = dev.type == "cpu"  # a GPU's process CPU time says nothing: its wall time is what is judged
    rows = _rows(outs, wall if on_cpu else {}, cpu if on_cpu else wall, f"{dev.type}_ms_per_step", n, rank, steps,
                 cfg_passes_for(dev))
    return [{**r, "preset": cfg.name, "image_size": cfg.backbone.image_size} for r in rows]  # kept in `extra`


def _rows(outs: dict, wall: dict[str, list[float]], judged_times: dict[str, list[float]], metric: str, n: int,
          rank: int, steps: int, auto: str) -> list[dict]:
    """judged_times (stored as `metric`): what the ratios are judged on, process CPU time on a CPU
    (cpu_ms_per_step, with the wall clock beside it) or the synchronised wall time on a GPU (cuda_ms_per_step)."""
    import torch

    ms = {k: 1000 * statistics.median(v) / steps for k, v in judged_times.items()}
    ms_wall = {k: 1000 * statistics.median(v) / steps for k, v in wall.items()}
    common = {"batch": n, "rows_per_forward": 2 * n, "steps": steps, "rank": rank, "threads": torch.get_num_threads()}
    rows = [{"case": k, "metric": metric, "value": round(v, 3), "unit": "ms", **common} for k, v in ms.items()]
    rows += [{"case": k, "metric": "wall_ms_per_step", "value": round(v, 3), "unit": "ms", **common}
             for k, v in ms_wall.items()]
    for num, den in (("asymmetric", "plain"), ("asymmetric_split", "asymmetric"), ("same_lora_split", "same_lora"),
                     ("two_pass_batch", "asymmetric"), ("two_pass_per_sample", "asymmetric")):
        name, ratio = f"{num}/{den}", round(ms[num] / ms[den], 3)
        rows.append({"case": name, "metric": "ratio", "value": ratio, "unit": "x",  # judged as shown and stored
                     **judged(ratio, GOALS.get(name)), **common})
        if ms_wall:
            rows.append({"case": name, "metric": "wall_ratio", "value": round(ms_wall[num] / ms_wall[den], 3),
                         "unit": "x", **common})
    # which arrangement `sample` runs here by default, and whether it was the faster one on this run
    faster = {k: "joint" if ms[k] <= ms[f"{k}_split"] else "split" for k in ("asymmetric", "same_lora")}
    for k, best in faster.items():
        rows.append({"case": f"auto_{k}", "metric": "picks_faster", "value": int(auto == best), "unit": "0/1",
                     "auto": auto, "faster": best, **common})
    # every arrangement and the two-pass reference must give the same images
    diffs = {"asymmetric_split": "asymmetric", "same_lora_split": "same_lora", "two_pass_batch": "asymmetric",
             "two_pass_per_sample": "asymmetric"}
    for k, ref in diffs.items():
        rows.append({"case": f"{ref}_vs_{k}", "metric": "max_abs_diff",
                     "value": float((outs[ref] - outs[k]).abs().max()), "unit": "", **common})
    return rows




if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(format_rows(run(parser.parse_args())))
