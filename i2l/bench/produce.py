"""Benchmark of `produce`: LoRAs/s of the Ray actor pool with 1 and 2 actors (actor start-up excluded: it is paid
once per actor), against the same work (decode, one batched predictor forward, write, hash, norms) in this process.

Goal: 2 actors >= 1.7x one actor. Uses an untrained checkpoint of the preset's sizes (speed does not depend on
training) unless --checkpoint is given. `python -m i2l.bench.produce`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from i2l.bench import format_rows, judged, torch_threads

GOALS = {"2_actors/1_actor": (">=", 1.7)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="preset whose model sizes are timed (default: toy)")
    p.add_argument("--checkpoint", default=None, help="a trained run/checkpoint dir (default: an untrained one)")
    p.add_argument("--styles", type=int, default=64, help="styles to produce per case")
    p.add_argument("--refs", type=int, default=4, help="references per style")
    p.add_argument("--batch-size", type=int, default=8, help="styles per actor call")
    p.add_argument("--workers", default="1,2", help="comma-separated actor counts")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temporary one, deleted)")


def write_untrained_checkpoint(cfg, root: Path) -> Path:
    """A valid toy checkpoint without training: fresh toy backbone and encoder saved as the pretrain commands do,
    and a freshly initialised predictor (its B heads nudged off zero so that LoRAs are not all zero)."""
    import json

    import torch

    from i2l.layout import resolve_paths
    from i2l.toy.backbone import new_toy_backbone
    from i2l.toy.encoder import new_toy_encoder
    from i2l.train.checkpoint import save_checkpoint
    from i2l.train.loop import build_predictor

    if cfg.backbone.kind != "toy" or cfg.encoder.kind != "toy":
        raise ValueError("an untrained checkpoint can be made for toy presets only: pass --checkpoint")
    cfg.data_root = str(root)
    cfg = resolve_paths(cfg)
    words = ["one", "two", "small", "large", "circle", "square", "star", "triangle", "at", "the", "top", "bottom",
             "left", "right", "in", "middle"]
    bb = new_toy_backbone(cfg.backbone, ["<pad>", "<unk>", *words]).freeze()
    bb.save(cfg.backbone.path)
    enc = new_toy_encoder(cfg.encoder)
    enc.model.save_pretrained(cfg.encoder.path, safe_serialization=True)
    (Path(cfg.encoder.path) / "encoder.json").write_text(json.dumps({"kind": "toy", "image_size": cfg.encoder.image_size}))
    pred = build_predictor(cfg, bb, enc)
    with torch.no_grad():
        for p in pred.head_B.D:
            p.normal_(0, 0.02)
    opt = torch.optim.AdamW(pred.parameters())
    return save_checkpoint(root / "run", 0, pred, opt, bb, enc, cfg, [])


def toy_jobs(styles: int, refs: int, size: int = 32) -> list:
    from i2l.config import ToyWorldConfig
    from i2l.produce.jobs import StyleJob
    from i2l.toy.world import generate_rows

    by_style: dict[str, list] = {}
    for row, _ in generate_rows(ToyWorldConfig(styles=styles, size=size, seed=123)):
        by_style.setdefault(row["id"].split("_")[0], []).append(row)
    return [StyleJob(s, [r["id"] for r in rows[:refs]], [r["image"]["bytes"] for r in rows[:refs]])
            for s, rows in by_style.items()]


def run(args: argparse.Namespace) -> list[dict]:
    from i2l.cluster import ensure_ray
    from i2l.config import get_config
    from i2l.io import file_sha256
    from i2l.produce.producer import LoRAProducer
    from i2l.produce.stage import produce
    from i2l.store import Store

    workers = [int(w) for w in str(args.workers).split(",") if w]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="i2l-bench-produce-"))
    try:
        ck = Path(args.checkpoint) if args.checkpoint else write_untrained_checkpoint(get_config(args.preset), work)
        jobs = toy_jobs(args.styles, args.refs)
        common = {"styles": len(jobs), "refs": args.refs, "batch_size": args.batch_size}
        rows = []

        from i2l.train.checkpoint import resolve_checkpoint

        ck_dir = resolve_checkpoint(ck)  # verified, as produce itself loads it
        out = work / "out-in-process"
        out.mkdir(parents=True, exist_ok=True)
        with torch_threads(1):  # baseline: the actor's own code in this process, one thread as each CPU actor gets
            t0 = time.perf_counter()
            local = LoRAProducer(str(ck_dir), str(out), "cpu", "bench",
                                 file_sha256(ck_dir / "predictor.safetensors"))
            startup = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(0, len(jobs), args.batch_size):
                local.make(jobs[i:i + args.batch_size])
            base = len(jobs) / (time.perf_counter() - t0)
        rows += [{"case": "in_process", "metric": "loras_per_s", "value": round(base, 2), "unit": "LoRA/s", **common},
                 {"case": "in_process", "metric": "startup_s", "value": round(startup, 2), "unit": "s", **common}]
        del local

        ensure_ray(num_cpus=max(workers))  # cluster start-up is not the pool's cost
        rates = {}
        for w in workers:
            out = work / f"out-{w}"
            shutil.rmtree(out, ignore_errors=True)
            store = Store(work / f"bench-{w}.duckdb")
            s = produce(ck, jobs, out, store, workers=w, batch_size=args.batch_size, progress=False)
            rates[w] = (s.produced - 1) / s.pool_seconds  # the gray LoRA is one extra, tiny, batch
            rows += [{"case": f"{w}_actors", "metric": "loras_per_s", "value": round(rates[w], 2), "unit": "LoRA/s",
                      **common},
                     {"case": f"{w}_actors", "metric": "startup_s", "value": round(s.seconds - s.pool_seconds, 2),
                      "unit": "s", **common},
                     {"case": f"{w}_actors", "metric": "vs_in_process", "value": round(rates[w] / base, 3),
                      "unit": "x", **common}]
        if 1 in rates and 2 in rates:
            ratio = round(rates[2] / rates[1], 3)
            rows.append({"case": "2_actors/1_actor", "metric": "ratio", "value": ratio, "unit": "x",
                         **judged(ratio, GOALS["2_actors/1_actor"]), **common})
        return rows
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    print(format_rows(run(parser.parse_args())))
