"""Predictor training steps with and without the frozen-output caches (train.cache_frozen): the reference encoder's
tokens per reference row and the text encoder's conditioning per prompt, kept instead of decoded and encoded again
each step. Both cases run the training loop's own batch code (`conditioned_batch`) on identical tuple streams of a
small toy world, interleaved, medians; the cache is warmed first (the steady state of a run past its first epoch).
Reported: each case's ms per step and steps/s, and uncached / cached (the speed-up), for the whole step and for
its conditioning part alone (decode + frozen encoders + predictor forward, no backward)."""

from __future__ import annotations

import argparse
import statistics

from i2l.bench import torch_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="toy", help="config preset (models are freshly initialised: speed only)")
    p.add_argument("--styles", type=int, default=40, help="styles of the toy world the tuples are drawn from")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=30, help="untimed rounds (they also fill the cache)")
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (repeatable)")


def run(args: argparse.Namespace) -> list[dict]:
    with torch_threads(args.threads):
        return _measure(args)


def _measure(args: argparse.Namespace) -> list[dict]:
    import dataclasses
    import tempfile

    import torch

    from i2l.bench._steps import Steps, tag_rows
    from i2l.bench._timing import interleaved, median_ratio
    from i2l.data.tuples import TupleStream
    from i2l.model.flow_matching import fm_backward
    from i2l.toy.world import write_toyworld
    from i2l.train.loop import FrozenCaches, _batches, conditioned_batch
    from i2l.train.step import timestep_sampler

    st = Steps.build(args.preset, args.device, args.overrides)
    cfg = st.cfg
    opt = torch.optim.AdamW(st.pred.parameters(), lr=1e-4)
    timesteps = timestep_sampler(cfg, st.bb)
    caches = FrozenCaches.build(cfg, st.bb, st.enc)
    with tempfile.TemporaryDirectory() as tmp:
        write_toyworld(dataclasses.replace(cfg.toyworld, styles=args.styles), tmp, progress=False)

        def stream():
            return _batches(TupleStream(tmp, "train", cfg.predictor.max_refs, cfg.train.seed,
                                        targets_per_lora=cfg.train.targets_per_lora), cfg.train.batch_size)

        feeds = {name: stream() for name in ("uncached", "cached", "cond_uncached", "cond_cached")}

        def step(name: str, backward: bool):
            def run_step():
                use = caches if name.endswith("_cached") or name == "cached" else None
                x1, cond, lora, _ = conditioned_batch(cfg, next(feeds[name]), st.bb, st.enc, st.pred, st.device,
                                                      use)
                if backward:
                    fm_backward(st.bb, x1, cond, lora, opt, timesteps=timesteps)
                    opt.step()
                st.sync()
            return run_step

        cases = {"uncached": step("uncached", True), "cached": step("cached", True),
                 "cond_uncached": step("cond_uncached", False), "cond_cached": step("cond_cached", False)}
        times = interleaved(cases, args.rounds, args.warmup, rotate=True)
    rows = []
    for k, v in times.items():
        rows += [{"case": f"train_step_{k}", "metric": "median_ms", "value": 1000 * statistics.median(v), "unit": "ms"},
                 {"case": f"train_step_{k}", "metric": "steps_per_s", "value": 1 / statistics.median(v),
                  "unit": "steps/s"}]
    rows += [{"case": "train_step_uncached/cached", "metric": "ratio", "value": median_ratio(times["uncached"],
                                                                                          times["cached"]),
              "unit": "x (speed-up of the whole step)"},
             {"case": "conditioning_uncached/cached", "metric": "ratio",
              "value": median_ratio(times["cond_uncached"], times["cond_cached"]),
              "unit": "x (decode + frozen encoders + predictor forward)"}]
    stats = caches.stats()
    hit = stats["cache_refs_hits"] / max(1, stats["cache_refs_hits"] + stats["cache_refs_misses"])
    rows += [{"case": "cache", "metric": "ref_hit_rate", "value": hit, "unit": "share (warm-up included)"},
             {"case": "cache", "metric": "ref_cache_mb", "value": stats["cache_refs_mb"], "unit": "MiB"},
             {"case": "setup", "metric": "rows_per_step", "value": cfg.train.batch_size, "unit": "targets"},
             {"case": "setup", "metric": "toy_world_styles", "value": args.styles, "unit": "styles"}]
    return tag_rows(rows, args.preset, args.overrides)
