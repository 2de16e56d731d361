"""A training run's loss curve (a list of per-step records with a "loss") and its summary. Torch-free: the
launching process reads a finished run's curve without importing what trained it."""

from __future__ import annotations


def loss_summary(curve: list[dict], first: int = 20, last: int = 20) -> dict:
    """The mean loss of the first `first` and of the last `last` records of a loss curve (None when empty)."""
    return {"first_loss": _mean_loss(curve[:first]), "last_loss": _mean_loss(curve[-last:])}


def _mean_loss(recs: list[dict]) -> float | None:
    return sum(r["loss"] for r in recs) / len(recs) if recs else None
