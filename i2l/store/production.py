"""The SQL that LoRA production speaks: which checkpoint a sha256 is, and which LoRAs of it the store holds."""

from __future__ import annotations

from i2l.store.results import Store


def checkpoint_id_by_sha(store: Store, sha256: str) -> str | None:
    """The id training recorded for the checkpoint with these predictor weights (the oldest, if several)."""
    known = store.rows("SELECT checkpoint_id FROM checkpoints WHERE sha256 = ? ORDER BY created_at LIMIT 1",
                       [sha256])
    return known[0][0] if known else None


def lora_ids_ending(store: Store, suffix: str) -> set[str]:
    """The ids of the recorded LoRAs whose id ends with `suffix` (produce keys its LoRAs `<what>@<sha12>`)."""
    return {r[0] for r in store.rows("SELECT lora_id FROM loras WHERE ends_with(lora_id, ?)", [suffix])}
