"""Weights seen from their safetensors headers only (8-byte length + JSON table: names, dtypes, shapes, offsets):
a component directory's files, shard indexes and every shard they name, and the shapes a config implies, built on
the meta device. No tensor data is read, so a full-size checkpoint is checked in seconds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from i2l.io import NotSafetensors, safetensors_table

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
         "F8_E4M3": 1, "F8_E5M2": 1}


class HeaderError(ValueError):
    """A file that is not a whole safetensors file."""


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    file: str  # the file it is in, relative to the checkpoint directory


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """name -> (dtype, shape, end offset) from a safetensors header; HeaderError if the file is not whole."""
    try:
        table, _, _ = safetensors_table(path)
        return {k: (v["dtype"], tuple(v["shape"]), v["data_offsets"][1]) for k, v in table.items()}
    except NotSafetensors as e:
        raise HeaderError(f"{path.name} is {e}") from None
    except (KeyError, TypeError):
        raise HeaderError(f"{path.name} is not a safetensors file (its header is not a tensor table)") from None


@dataclass
class Weights:
    """The tensors of one component directory, and what is wrong with its files."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what is wrong, naming the file; what to do)

    @property
    def params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    @property
    def dtypes(self) -> str:
        count: dict[str, int] = {}
        for t in self.tensors.values():
            count[t.dtype] = count.get(t.dtype, 0) + math.prod(t.shape)
        return "/".join(d.lower() for d, _ in sorted(count.items(), key=lambda kv: -kv[1])) or "-"


def read_weights(directory: Path, root: Path) -> Weights:
    """All safetensors weights of `directory` (names relative to `root` in messages): through its
    `*.safetensors.index.json` when it has one (every shard named must be there and hold what the index says),
    else every `*.safetensors` file in it."""
    w = Weights()
    rel = lambda p: str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            _read_index(index, w, rel)
        return w
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        why = f"only pickled weights ({', '.join(other)})" if other else "no .safetensors weights"
        w.problems.append((f"{rel(directory)}/ has {why}",
                           "i2l loads safetensors only: copy the checkpoint's .safetensors files there"))
    for f in files:
        _read_file(f, w, rel)
    return w


def _read_file(f: Path, w: Weights, rel) -> set[str]:
    try:
        table = read_header(f)
    except HeaderError as e:
        w.problems.append((f"{rel(f.parent)}/{e}", "re-copy this file from the published checkpoint"))
        return set()
    except OSError as e:
        w.problems.append((f"{rel(f)} cannot be read ({e.strerror or e})", "check its permissions"))
        return set()
    for k, (dtype, shape, _) in table.items():
        w.tensors[k] = Tensor(dtype, shape, rel(f))
    return set(table)


def _read_index(index: Path, w: Weights, rel) -> None:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        w.problems.append((f"{rel(index)} is not a shard index (no weight_map)", "re-copy it"))
        return
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    for shard, keys in sorted(shards.items()):
        f = index.parent / shard
        if Path(shard).name != shard:  # a path from a data file is never followed outside the directory
            w.problems.append((f"{rel(index)} names shard {shard!r} outside its directory", "re-copy the index"))
            continue
        if not f.is_file():
            w.problems.append((f"shard {rel(f)} is missing ({len(keys)} weights of {rel(index)} are in it)",
                               f"copy every file the index names ({len(shards)} shards) into {rel(index.parent)}/"))
            continue
        found = _read_file(f, w, rel)
        lost = [k for k in keys if k not in found]
        if found and lost:
            w.problems.append((f"{rel(f)} lacks {len(lost)} weight(s) {rel(index)} puts there (e.g. {lost[0]})",
                               "the shard and its index are from different copies: re-copy both"))


def expected_shapes(build) -> tuple[dict[str, tuple[int, ...]], list[set[str]]]:
    """The state dict's shapes of the module `build()` makes on the meta device (no memory, no weights), and the
    groups of names that share one tensor (tied weights: a checkpoint stores one of them)."""
    import torch

    with torch.device("meta"):
        module = build()
    sd = module.state_dict(keep_vars=True)
    groups: dict[int, set[str]] = {}
    for name, t in sd.items():
        groups.setdefault(id(t), set()).add(name)
    return {k: tuple(v.shape) for k, v in sd.items()}, list(groups.values())


def compare_shapes(expected: dict[str, tuple[int, ...]], tied: list[set[str]], w: Weights, config: str,
                   prefix: str = "") -> list[tuple[str, str]]:
    """Problems where the weights (under `prefix`) and the shapes `config` implies disagree: missing weights and
    wrong shapes, each naming the file and what to do."""
    problems = []
    have = {k.removeprefix(prefix) for k in w.tensors if k.startswith(prefix)}
    alias = {n: g for g in tied for n in g}
    missing = sorted(k for k in expected if k not in have and not (alias.get(k, {k}) & have))
    if missing:
        problems.append((f"{len(missing)} weight(s) that {config} implies are in no file (e.g. {prefix + missing[0]})",
                         "the checkpoint is incomplete or of another model: re-copy it"))
    wrong = [(k, w.tensors[prefix + k], shape) for k, shape in expected.items()
             if prefix + k in w.tensors and w.tensors[prefix + k].shape != shape]
    for k, t, shape in wrong[:3]:
        problems.append((f"{t.file}: {prefix + k} has shape {list(t.shape)} but {config} implies {list(shape)}",
                         f"{t.file} and {config} are from different checkpoints: re-copy both from one"))
    if len(wrong) > 3:
        problems.append((f"{len(wrong) - 3} more weight(s) of the wrong shape", "re-copy the checkpoint"))
    return problems
