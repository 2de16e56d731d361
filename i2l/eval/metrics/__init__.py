"""Scorers for generated images: the `Scorer` protocol, the batch they read, and long-format score rows.
A scorer that cannot run (no weights configured, package missing) yields rows with status 'skipped' and the
reason, never numbers. Metric definitions: clip.py (CLIP), leakage.py (semantic leakage), plugins.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

METRICS = ("clip_text", "clip_style", "ref_style_sim", "leakage", "aesthetic", "pickscore", "imagereward",
           "hpsv2", "hpsv3")
LOWER_IS_BETTER = frozenset({"leakage"})


@dataclass
class ScoreBatch:
    """B generated images with what they were made from. `references` / `reference_prompts` may be empty
    (then ref_style_sim / leakage are skipped) or hold one list per image."""

    images: list[Image.Image]
    prompts: list[str]  # content prompt of each image
    styles: list[str]  # style description of each image's references
    references: list[list[Image.Image]] = field(default_factory=list)
    reference_prompts: list[list[str]] = field(default_factory=list)  # content prompts of the references

    def __post_init__(self):
        n = len(self.images)
        for name in ("prompts", "styles"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ScoreBatch.{name} has {len(getattr(self, name))} items for {n} images")
        for name in ("references", "reference_prompts"):
            if getattr(self, name) and len(getattr(self, name)) != n:
                raise ValueError(f"ScoreBatch.{name} must be empty or have one list per image ({n})")

    def __len__(self) -> int:
        return len(self.images)


@runtime_checkable
class Scorer(Protocol):
    name: str
    version: str
    metrics: tuple[str, ...]

    def available(self) -> tuple[bool, str]:
        """(True, "") when it can score; else (False, why and what to configure)."""
        ...

    def score(self, batch: ScoreBatch) -> dict[str, list[float | None]]:
        """One value per image for each metric; None where the sample lacks an input (e.g. no references)."""
        ...


def build_scorers(cfg) -> list[Scorer]:
    """All scorers of `cfg.scorer` (a Config): CLIP (toy or real checkpoint) first, then the plugins."""
    from i2l.eval.metrics.clip import ClipScorer
    from i2l.eval.metrics.plugins import build_plugins

    return [ClipScorer(cfg.scorer, default_scorer_dir(cfg)), *build_plugins(cfg.scorer)]


def score_samples(scorers: list[Scorer], batch: ScoreBatch) -> list[dict]:
    """Long rows {index, metric, value, scorer, scorer_version, status, reason}: one per image, metric, scorer.

    `index` is the image's position in `batch`. Skipped scorers (and per-sample gaps) have value None.
    """
    rows: list[dict] = []
    for sc in scorers:
        ok, reason = sc.available()
        rows += scorer_rows(sc, ok, reason, sc.score(batch) if ok and len(batch) else {}, len(batch))
    return rows


def scorer_rows(sc: Scorer, ok: bool, reason: str, values: dict[str, list], n: int) -> list[dict]:
    """The rows of one scorer over n images from its `available()` verdict and what its `score` returned (the
    same rows whether it scored here or in a Ray actor: i2l/eval/metrics/actors.py)."""
    rows: list[dict] = []
    version = sc.version if ok else ""
    for metric in sc.metrics:
        vals = values.get(metric)
        if ok and vals is not None and len(vals) != n:
            raise RuntimeError(f"scorer {sc.name} returned {len(vals)} {metric} values for {n} images")
        for i in range(n):
            v = vals[i] if ok and vals is not None else None
            if not ok:
                status, why = "skipped", reason
            elif v is None:
                status, why = "skipped", f"{metric} needs inputs this sample lacks (references or their prompts)"
            else:
                status, why = "ok", ""
            rows.append({"index": i, "metric": metric, "value": None if v is None else float(v),
                         "scorer": sc.name, "scorer_version": version, "status": status, "reason": why})
    return rows


def default_scorer_dir(cfg) -> str:
    """Where `i2l pretrain-scorer` writes the toy scorer by default and build_scorers looks for it."""
    from i2l.layout import paths_for

    return str(paths_for(cfg).scorer_dir)  # <data_root>/toy/<preset>/scorer, where the flows put it
