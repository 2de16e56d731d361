"""LoRA file formats: the key layouts of the programs that read i2l's LoRA files (`LoRA.save(format=...)`).

- diffusers: `<prefix>.<module>.lora_A.weight`, prefix the pipeline component (`transformer`), diffusers' module
  names; `load_lora_weights` reads it.
- diffsynth: `<module>.lora_A.weight`, no prefix, the module names of DiffSynth's own DiT classes: its
  `GeneralLoRALoader` strips only a leading `diffusion_model.` and scales by α/r only where `.alpha` keys exist.
- comfyui: `diffusion_model.<module>.lora_A.weight`, the module names of ComfyUI's model (the original checkpoint's).

A backbone names its layers as each consumer does with a table (`Backbone.lora_names(format)`): (regex on the
diffusers module name, the consumer's name as a `re` template) pairs. Modules that several pairs send to one name
are one fused layer there (q, k, v -> qkv), written as an exactly equal LoRA: A stacked (Σr, in), B block-diagonal
(Σout, Σr), so B·A = [B_q·A_q; B_k·A_k; B_v·A_v]. The file records which modules a renamed or fused layer holds
(metadata `i2l.layers`), so reading it back needs no table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import torch
from safetensors import safe_open

from i2l.config.sections import LORA_FORMATS

# the key prefix each consumer's loader expects; diffusers' is the pipeline component, given by the backbone
FIXED_PREFIX = {"diffsynth": "", "comfyui": "diffusion_model"}
NameTable = Sequence[tuple[str, str]]


def check_format(fmt: str) -> str:
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA file format {fmt!r}: choose one of {', '.join(LORA_FORMATS)} "
                         f"(diffusers: load_lora_weights; diffsynth: DiffSynth-Studio; comfyui: ComfyUI)")
    return fmt


def group_modules(names: list[str], table: NameTable) -> dict[str, list[str]]:
    """The consumer's layer name -> the LoRA modules it holds (several: a fused layer, in table order); modules no
    pair matches keep their name. Refuses a fused layer the LoRA covers only in part: the other parts' sizes are
    not in the LoRA, and a LoRA on a fused layer changes all of its rows."""
    rules = [(re.compile(p), t) for p, t in table]
    groups: dict[str, list[tuple[int, str]]] = {}
    for n in names:
        target, order = n, -1
        for i, (rx, template) in enumerate(rules):
            if m := rx.fullmatch(n):
                target, order = m.expand(template), i
                break
        groups.setdefault(target, []).append((order, n))
    out = {}
    for target, members in groups.items():
        members.sort(key=lambda x: x[0])
        parts = sum(t == table[members[0][0]][1] for _, t in table) if members[0][0] >= 0 else 1
        if len(members) != parts:
            raise ValueError(f"{target} is one layer of this file format's model, made of {parts} of i2l's; the LoRA "
                             f"adapts {len(members)} of them ({[n for _, n in members]}): save it as diffusers or "
                             f"adapt all {parts}")
        out[target] = [n for _, n in members]
    return out


def to_file_layers(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], table: NameTable
                   ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list]]:
    """(consumer layer -> (A, B)) and the record of renamed / fused layers: layer -> [[module, out, r], ...]."""
    layers, record = {}, {}
    for target, members in group_modules(list(A), table).items():
        if len(members) == 1:
            a, b = A[members[0]], B[members[0]]
        else:
            a = torch.cat([A[m] for m in members])  # (Σr, in)
            b = torch.block_diag(*[B[m] for m in members])  # (Σout, Σr): part i sees only its own rank block
        layers[target] = (a, b)
        if members != [target]:
            record[target] = [[m, B[m].shape[0], A[m].shape[0]] for m in members]
    return layers, record


def from_file_layers(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], meta: dict[str, str],
                     source: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Undo `to_file_layers` with the file's metadata (its format and layer record): fused layers split into
    their modules, names back to i2l's."""
    if meta.get("i2l.lora_format") not in LORA_FORMATS:
        raise ValueError(f"{source}: written in LoRA file format {meta.get('i2l.lora_format')!r}, which this "
                         f"version of i2l does not read (it reads {', '.join(LORA_FORMATS)})")
    record_json = meta.get("i2l.layers")
    try:
        record = json.loads(record_json) if record_json else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: unreadable i2l.layers metadata ({e}); write the file again") from e
    A, B = dict(A), dict(B)
    for target, parts in record.items():
        if target not in A:
            raise ValueError(f"{source}: i2l.layers names {target}, which the file does not hold")
        a, b = A.pop(target), B.pop(target)
        outs, ranks = [int(p[1]) for p in parts], [int(p[2]) for p in parts]
        if sum(outs) != b.shape[0] or sum(ranks) != a.shape[0] or b.shape[1] != a.shape[0]:
            raise ValueError(f"{source}: {target} is lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, but "
                             f"i2l.layers says its parts are out {outs} and rank {ranks}")
        o = r = 0
        for (name, *_), out, rank in zip(parts, outs, ranks):
            A[name], B[name] = a[r:r + rank], b[o:o + out, r:r + rank]
            o, r = o + out, r + rank
    return A, B


def file_format(path) -> str:
    """The format a LoRA file was written in, from its metadata (files without the record: diffusers)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("i2l.lora_format", "diffusers")
