"""Training tuples (paper §3.3): 1..N references of a style + a target of the SAME style with DIFFERENT
content; the prompt describes the target's content. Streamed row group by row group with a small style buffer,
deterministic from the seed, so a resumed run sees exactly the tuples an uninterrupted run would.

With targets_per_lora = G > 1 the stream yields G consecutive tuples that share one reference set (same style,
G different targets): training predicts that LoRA once and applies it to all G targets, so the predictor's
cost per backbone sample falls G-fold while every target still has references of other contents."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from i2l.data.images import decode, to_tensor
from i2l.data.shards import iter_rows, split_files


@dataclass
class StyleTuple:
    style_id: str
    prompt: str  # the target's content
    target: bytes  # encoded image
    refs: list[bytes]  # 1..N encoded images of the same style, other contents
    group: int = 0  # tuples with the same group share this reference set (one predicted LoRA)
    ref_ids: tuple[str, ...] = ()  # the references' row ids in the prepared shards (keys of the token cache)


def _owner(style_id: str, world: int) -> int:
    return int(hashlib.sha1(style_id.encode()).hexdigest(), 16) % world


class TupleStream:
    """Endless iterator of StyleTuples for one data-parallel rank (styles are partitioned by hash)."""

    def __init__(self, data_dir, split: str = "train", max_refs: int = 4, seed: int = 0, rank: int = 0,
                 world: int = 1, buffer_styles: int = 64, p_single: float = 0.25, targets_per_lora: int = 1):
        if targets_per_lora < 1:
            raise ValueError("targets_per_lora must be >= 1")
        self.targets_per_lora = targets_per_lora
        self.data_dir, self.split = data_dir, split
        self.max_refs, self.seed, self.rank, self.world = max_refs, seed, rank, world
        self.buffer_styles, self.p_single = buffer_styles, p_single
        split_files(data_dir, split)  # fail early and clearly if there is no data

    def _styles(self, epoch: int) -> Iterator[list[dict]]:
        """Rows grouped by style (styles are consecutive in shards), this rank's styles only."""
        cur, rows = None, []
        for row in iter_rows(self.data_dir, self.split, columns=("id", "image", "content")):
            if row["style_id"] != cur:
                if rows and _owner(cur, self.world) == self.rank:
                    yield rows
                cur, rows = row["style_id"], []
            rows.append(row)
        if rows and _owner(cur, self.world) == self.rank:
            yield rows

    def __iter__(self) -> Iterator[StyleTuple]:
        for epoch in itertools.count():
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            buffer: list[list] = []  # [rows, tuples left]
            source = self._styles(epoch)
            exhausted = False
            group = epoch << 32  # unique across epochs, so a batch never merges two reference sets
            made_any = False
            while True:
                while not exhausted and len(buffer) < self.buffer_styles:
                    rows = next(source, None)
                    if rows is None:
                        exhausted = True
                    elif len(rows) >= 2:  # a style needs a target and at least one other reference
                        buffer.append([rows, len(rows)])
                if not buffer:
                    break
                made_any = True
                i = int(rng.integers(len(buffer)))
                rows, left = buffer[i]
                made = self._make(rows, rng, group)
                yield from made
                group += 1
                if left <= len(made):
                    buffer.pop(i)
                else:
                    buffer[i][1] = left - len(made)
            if not made_any:  # every later epoch would be as empty: looping on would hang the trainer
                raise ValueError(
                    f"rank {self.rank} of world size {self.world}: no style with 2+ rows in the {self.split} split of "
                    f"{self.data_dir} falls to this rank (a tuple needs a target and a reference of one style; "
                    f"styles are split over the {self.world} workers by hash). Lower train.num_workers, or use data "
                    "with at least one style of 2+ rows per worker")

    def _make(self, rows: list[dict], rng: np.random.Generator, group: int) -> list[StyleTuple]:
        """Up to G targets of one style + one reference set drawn from its rows of other contents."""
        g = max(1, min(self.targets_per_lora, len(rows) - 1))  # leave at least one row for references
        targets = [int(j) for j in rng.choice(len(rows), size=g, replace=False)]
        contents = {rows[t]["content"] for t in targets}
        others = [r for j, r in enumerate(rows) if j not in targets and r["content"] not in contents]
        others = others or [r for j, r in enumerate(rows) if j not in targets]  # one content repeated
        hi = min(self.max_refs, len(others))
        # single-reference tuples are kept on purpose: one-shot use must work (paper §3.3)
        n = 1 if (hi == 1 or rng.random() < self.p_single) else int(rng.integers(2, hi + 1))
        picks = rng.choice(len(others), size=n, replace=False)
        refs = [others[j]["image"] for j in picks]
        ids = tuple(str(others[j]["id"]) for j in picks)
        return [StyleTuple(rows[t]["style_id"], rows[t]["content"], rows[t]["image"], refs, group, ids)
                for t in targets]


def _refs(tuples: list[StyleTuple], ref_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> refs (B, N, 3, h, w) zero-padded to the largest N, n_refs (B,)."""
    N = max(len(t.refs) for t in tuples)
    refs = torch.zeros(len(tuples), N, 3, ref_size, ref_size)
    for i, t in enumerate(tuples):
        refs[i, : len(t.refs)] = to_tensor([decode(b) for b in t.refs], ref_size)
    return refs, torch.tensor([len(t.refs) for t in tuples])


def collate(tuples: list[StyleTuple], image_size: int, ref_size: int):
    """-> targets (B, 3, H, W), prompts, refs (B, N, 3, h, w) zero-padded, n_refs (B,)."""
    targets = to_tensor([decode(t.target) for t in tuples], image_size)
    return (targets, [t.prompt for t in tuples], *_refs(tuples, ref_size))


def collate_groups(tuples: list[StyleTuple], image_size: int, ref_size: int):
    """Like `collate`, but each shared reference set once: -> targets (B, 3, H, W), prompts,
    refs (U, N, 3, h, w), n_refs (U,), owner (B,) = the reference set (so the predicted LoRA) of each target."""
    firsts, owner = _groups(tuples)
    targets = to_tensor([decode(t.target) for t in tuples], image_size)
    return (targets, [t.prompt for t in tuples], *_refs(firsts, ref_size), owner)


def collate_group_sets(tuples: list[StyleTuple], image_size: int):
    """`collate_groups` without decoding the references (a token cache decodes only those it lacks):
    -> targets (B, 3, H, W), prompts, sets (U lists of (row id, encoded image)), owner (B,)."""
    firsts, owner = _groups(tuples)
    if any(len(t.ref_ids) != len(t.refs) for t in firsts):
        raise ValueError("these tuples carry no reference row ids (StyleTuple.ref_ids): use collate_groups")
    targets = to_tensor([decode(t.target) for t in tuples], image_size)
    sets = [list(zip(t.ref_ids, t.refs)) for t in firsts]
    return targets, [t.prompt for t in tuples], sets, owner


def _groups(tuples: list[StyleTuple]) -> tuple[list[StyleTuple], torch.Tensor]:
    """-> the first tuple of each reference set, in first-seen order; owner (B,) = each tuple's set."""
    slot: dict[int, int] = {}  # group -> index of its reference set
    firsts: list[StyleTuple] = []
    for t in tuples:
        if t.group not in slot:
            slot[t.group] = len(firsts)
            firsts.append(t)
    return firsts, torch.tensor([slot[t.group] for t in tuples])
