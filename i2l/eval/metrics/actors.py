"""Scoring on Ray actors, one model per actor: each configured scorer gets its own ActorPool (i2l/cluster/pool.py)
of `scorer.workers` actors that load that one model once and score the evaluation's chunks, so a large evaluation
spreads over the cluster (GPU actors when the scorers run on cuda); the pools run side by side where the cluster
has the slots. A chunk travels as image files (the PNGs the evaluation saved: lossless, so an actor sees the
pixels the in-process path scores) and the rows are built here with the in-process path's own `scorer_rows`, so
the results store gets the same rows either way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from i2l.cluster.pool import ActorPool, Call, PoolOptions, cluster_slots, map_side_by_side
from i2l.eval.metrics import ScoreBatch, Scorer, scorer_rows


@dataclass(frozen=True)
class ScoreJob:
    """One chunk to score, by file: what ScoreBatch holds, with image paths in place of images."""

    images: list[str]
    prompts: list[str]
    styles: list[str]
    references: list[list[str]]
    reference_prompts: list[list[str]]

    def __len__(self) -> int:
        return len(self.images)

    def batch(self) -> ScoreBatch:
        return ScoreBatch([_open(p) for p in self.images], list(self.prompts), list(self.styles),
                          [[_open(p) for p in refs] for refs in self.references],
                          [list(t) for t in self.reference_prompts])


def _open(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class ScorerActor:
    """Holds one scorer of the config (its model loaded on the first chunk) and scores chunks."""

    def __init__(self, cfg, name: str, threads: int = 0):
        import torch

        from i2l.eval.metrics import build_scorers

        if threads > 0:  # the driver's: CPU results then equal the in-process path's bit for bit (Ray starts a
            torch.set_num_threads(threads)  # 1-CPU actor with one thread, and a matmul's sums follow the threads)
        self.scorer = next(s for s in build_scorers(cfg) if s.name == name)

    def score(self, k: int, job: ScoreJob) -> tuple[int, dict[str, list]]:
        """Job k's values (metric -> one per image), with k: results come back in finishing order."""
        return k, self.scorer.score(job.batch())


def actor_gpus(cfg) -> float:
    """GPUs per scorer actor: scorer.gpus_per_actor when the scorers run on cuda (scorer.device cuda*, or auto on a
    Ray cluster with GPUs), else 0 (one CPU each)."""
    device = cfg.scorer.device
    if device.startswith("cuda"):
        return cfg.scorer.gpus_per_actor
    if device == "auto":
        from i2l.cluster import ensure_ray

        return cfg.scorer.gpus_per_actor if ensure_ray().cluster_resources().get("GPU", 0) > 0 else 0.0
    return 0.0


def score_on_actors(cfg, scorers: list[Scorer], jobs: list[ScoreJob], progress: bool = True) -> list[list[dict]]:
    """The rows of every job (one list per job, in the order score_samples gives them), each available scorer
    run by its own pool of `cfg.scorer.workers` actors; an unavailable one gets its skipped rows here. The pools
    run side by side, as many at once as the cluster's slots hold (on 8 GPUs with one actor per scorer, all of
    Table 1's scorers load and score at once, not one after another)."""
    from i2l.cluster import ensure_ray

    gpus = actor_gpus(cfg)
    status = {sc.name: sc.available() for sc in scorers}
    threads = 0 if gpus else torch.get_num_threads()
    calls = [Call("score", (k, job), size=len(job)) for k, job in enumerate(jobs) if len(job)]
    work = [(ActorPool(ScorerActor, (cfg, sc.name, threads),
                       PoolOptions(workers=cfg.scorer.workers, num_gpus=gpus, name=f"score {sc.name}", unit="image",
                                   progress=progress, cpu_hint="set scorer.device=cpu",
                                   start_hint="every node must read the scorer's weights at the configured path")),
             calls) for sc in scorers if status[sc.name][0]]
    at_once = max(1, cluster_slots(ensure_ray(), gpus) // cfg.scorer.workers) if work else 1
    finished = iter(map_side_by_side(work, at_once))
    per_scorer: list[list[list[dict]]] = []  # scorer -> job -> rows
    for sc in scorers:
        ok, reason = status[sc.name]
        values = dict(done.value for done in next(finished)) if ok else {}  # job k -> metric -> values
        per_scorer.append([scorer_rows(sc, ok, reason, values.get(k, {}), len(job)) for k, job in enumerate(jobs)])
    return [[r for rows in per_scorer for r in rows[k]] for k in range(len(jobs))]
