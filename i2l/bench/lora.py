"""Benchmark of per-sample LoRA application: one toy-backbone forward over a batch of B samples with (a) no LoRA,
(b) one shared LoRA, (c) B different LoRAs batched through i2l's hooks, against (d) the same B LoRAs applied one
sample at a time through diffusers' PEFT adapters (load / set / delete around each forward, as a pipeline must).

Goals: (c)/(a) <= 1.15 and (d)/(c) >= 3. Interleaved rounds after warmup, medians. `python -m i2l.bench.lora`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

from i2l.bench import format_rows, judged, torch_threads
from i2l.bench._timing import interleaved, median_ratio

GOALS = {"c_batched_loras/a_no_lora": ("<=", 1.15), "d_peft_swap/c_batched_loras": (">=", 3.0)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="config preset whose toy backbone is timed (default: toy)")
    p.add_argument("--batch", type=int, default=16, help="samples per batch (B)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's predictor.rank)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (each runs every case once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    # 1 by default: on a shared 2-core machine, 2 OpenMP threads spin against other processes (10x noisier)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> list[dict]:
    with torch_threads(args.threads), warnings.catch_warnings():
        # diffusers/PEFT warn on every extra adapter of one model: expected here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        return _measure(args)


def _measure(args: argparse.Namespace) -> list[dict]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from i2l.config import get_config
    from i2l.model.lora import LoRA
    from i2l.toy.backbone import ToyBackbone, new_toy_backbone

    cfg = get_config(args.preset)
    if cfg.backbone.kind != "toy":
        raise ValueError("bench lora times the toy backbone: use --preset toy or debug")
    n, rank = args.batch, args.rank or cfg.predictor.rank
    words = ["a", "the", "red", "blue", "green", "circle", "square", "star", "small", "large", "at", "top", "bottom", "in", "middle"]
    bb = new_toy_backbone(cfg.backbone, ["<pad>", "<unk>", *words], seed=args.seed).freeze()
    g = torch.Generator().manual_seed(args.seed)
    size = cfg.backbone.image_size
    x = torch.randn(n, 3, size, size, generator=g)  # (B, 3, H, W)
    t = torch.rand(n, generator=g)  # (B,)
    prompts = [" ".join(words[i % 5: i % 5 + 4]) for i in range(n)]
    targets = bb.lora_targets()
    A = {k: torch.randn(n, rank, i, generator=g) * 0.05 for k, (i, o) in targets.items()}  # (B, r, in)
    B = {k: torch.randn(n, o, rank, generator=g) * 0.05 for k, (i, o) in targets.items()}  # (B, out, r)
    loras = LoRA(A, B, bb.backbone_id)  # B different LoRAs
    shared = loras[0]

    # The diffusers client: a pipeline around a copy of the same transformer (PEFT would otherwise wrap the
    # layers that cases a-c time), fed the LoRAs as the state dicts LoRA.save writes.
    client = ToyBackbone(cfg.backbone, copy.deepcopy(bb.transformer), bb.text_encoder)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                              tokenizer=None, transformer=client.transformer)
    state_dicts = [{f"transformer.{k}.lora_{m}.weight": getattr(lo, m)[k].contiguous() for k in lo.names
                    for m in "AB"} for lo in loras.unbind()]
    for i, sd in enumerate(state_dicts):  # preloaded adapters, for the set_adapters-only variant
        pipe.load_lora_weights(dict(sd), adapter_name=f"pre{i}")

    with torch.no_grad():
        cond = bb.encode_prompts(prompts)
        rows1 = [(x[i:i + 1], t[i:i + 1], cond.index(slice(i, i + 1))) for i in range(n)]

        def peft_swap():
            for i, (xi, ti, ci) in enumerate(rows1):
                pipe.load_lora_weights(dict(state_dicts[i]), adapter_name="swap")
                pipe.set_adapters(["swap"])
                client.velocity(xi, ti, ci)
                pipe.delete_adapters("swap")

        def peft_preloaded():
            for i, (xi, ti, ci) in enumerate(rows1):
                pipe.set_adapters([f"pre{i}"])
                client.velocity(xi, ti, ci)

        cases = {
            "a_no_lora": lambda: bb.velocity(x, t, cond),
            "b_shared_lora": lambda: bb.velocity(x, t, cond, shared),
            "c_batched_loras": lambda: bb.velocity(x, t, cond, loras),
            "d_peft_swap": peft_swap,
            "d_peft_preloaded": peft_preloaded,
            "e_i2l_one_at_a_time": lambda: [bb.velocity(xi, ti, ci, loras[i]) for i, (xi, ti, ci) in enumerate(rows1)],
        }
        times = {k: [1e3 * s for s in v]  # ms
                 for k, v in interleaved(cases, args.rounds, args.warmup, rotate=True).items()}

    return _rows(times, n, rank, len(targets), args.rounds)


def _rows(times: dict[str, list[float]], n: int, rank: int, layers: int, rounds: int) -> list[dict]:
    import torch

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, v in times.items():
        rows.append({"case": k, "metric": "ms_per_batch", "value": round(med[k], 3), "unit": "ms"})
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        rows.append({"case": k, "metric": "iqr_ms", "value": round(q[2] - q[0], 3), "unit": "ms"})
    for num, den in [("b_shared_lora", "a_no_lora"), ("c_batched_loras", "a_no_lora"),
                     ("d_peft_swap", "c_batched_loras"), ("d_peft_preloaded", "c_batched_loras"),
                     ("e_i2l_one_at_a_time", "c_batched_loras")]:
        # median of per-round ratios: both cases of a round ran back to back under the same machine load
        paired = round(median_ratio(times[num], times[den]), 3)
        rows.append({"case": f"{num}/{den}", "metric": "ratio", "value": paired, "unit": "x",
                     **judged(paired, GOALS.get(f"{num}/{den}"))})  # judged as shown and stored
    info = {"batch": n, "rank": rank, "layers": layers, "rounds": rounds,
            "threads": torch.get_num_threads()}
    rows += [{"case": "setup", "metric": k, "value": v, "unit": ""} for k, v in info.items()]
    return rows


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(format_rows(run(parser.parse_args())))
