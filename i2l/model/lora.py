"""LoRA weights: one LoRA or a batch of them (one per sample), their files and their combinations.
Applied to a model by `i2l.model.batched_lora.BatchedLoRA`.

Vocabulary as in PEFT: `lora_A` is [r, in], `lora_B` is [out, r]; the layer computes y = W·x + s·B·A·x with
the per-layer scale α already folded into B (ΔW = B·A, as the authors' release), so files load in diffusers
with scaling 1. Shapes: B batch, T tokens, r rank, `in`/`out` the linear layer's features.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from i2l.io import atomic_path, require_regular_file
from i2l.model.finite import MAX_ABS_WEIGHT, check_weights, require_finite
from i2l.model.lora_formats import FIXED_PREFIX, check_format, from_file_layers, to_file_layers

FORMAT_VERSION = "1"


@dataclass
class LoRA:
    """LoRA matrices for named linear layers; unbatched ([r, in], [out, r]) or batched ([B, r, in], [B, out, r])."""

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    backbone: str = ""  # backbone id the LoRA was made for (checked on load)
    meta: dict = field(default_factory=dict)
    # batched: each LoRA serves this many consecutive samples (`repeat_each`): the hooks apply it to its samples
    # as one matmul, without a copy per sample
    rows_per_lora: int = 1

    def __post_init__(self):
        if set(self.A) != set(self.B):
            raise ValueError("LoRA A and B must cover the same layers")

    @property
    def names(self) -> list[str]:
        return list(self.A)

    @property
    def batched(self) -> bool:
        return next(iter(self.A.values())).dim() == 3

    @property
    def batch_size(self) -> int:
        return next(iter(self.A.values())).shape[0] if self.batched else 1

    @property
    def samples(self) -> int:
        """How many samples a batched LoRA serves: batch_size, times rows_per_lora after `repeat_each`."""
        return self.batch_size * self.rows_per_lora

    @property
    def rank(self) -> int:
        return next(iter(self.A.values())).shape[-2]

    def to(self, device=None, dtype=None) -> LoRA:
        f = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}
        return LoRA(f(self.A), f(self.B), self.backbone, dict(self.meta), self.rows_per_lora)

    def to_host(self, dtype: torch.dtype = torch.float32) -> LoRA:
        """This LoRA on the CPU in `dtype` (fp32: what files and mixing use), moved in one copy.

        `.to("cpu", dtype)` copies matrix by matrix: hundreds of synchronous copies at real size, longer than the
        predictor's forward itself (16 klein LoRAs on an H100: 457 ms vs 17 ms here). Here the device converts and
        packs, and one copy lands in page-locked memory; the matrices returned are views of that buffer
        (safetensors writes views as they are), which returns to torch's pinned-memory cache for the next batch
        once the last of them is dropped."""
        names = self.names
        src = [self.A[k] for k in names] + [self.B[k] for k in names]
        if src[0].device.type == "cpu":
            return self.to("cpu", dtype)
        host = _host_copy(src, dtype, pin=src[0].device.type == "cuda")
        n = len(names)
        return LoRA(dict(zip(names, host[:n])), dict(zip(names, host[n:])), self.backbone, dict(self.meta),
                    self.rows_per_lora)

    def detach(self) -> LoRA:
        return LoRA({k: v.detach() for k, v in self.A.items()}, {k: v.detach() for k, v in self.B.items()},
                    self.backbone, dict(self.meta), self.rows_per_lora)

    def check_finite(self, source: str = "LoRA", bound: float | None = None) -> LoRA:
        """This LoRA, or a ValueError naming `source` and the first matrix holding NaN/Inf (or |w| > bound)."""
        check_weights({**{f"{k}.lora_A": v for k, v in self.A.items()},
                       **{f"{k}.lora_B": v for k, v in self.B.items()}}, source, bound=bound)
        return self

    def scaled(self, strength: float) -> LoRA:
        """Strength control: ΔW -> strength·ΔW."""
        require_finite(strength, "LoRA strength")
        return LoRA(dict(self.A), {k: v * strength for k, v in self.B.items()}, self.backbone, dict(self.meta),
                    self.rows_per_lora)

    def __getitem__(self, i: int) -> LoRA:
        if not self.batched:
            raise IndexError("an unbatched LoRA has no items")
        return LoRA({k: v[i] for k, v in self.A.items()}, {k: v[i] for k, v in self.B.items()}, self.backbone,
                    dict(self.meta))

    def take(self, index: torch.Tensor) -> LoRA:
        """Rows of a batched LoRA by index (B',) -> a batch of B' (differentiable): one LoRA serving many samples.
        On a `repeat_each` LoRA the index counts samples, as its hooks do."""
        if not self.batched:
            raise IndexError("an unbatched LoRA has no items")
        if self.rows_per_lora > 1:
            index = torch.div(index, self.rows_per_lora, rounding_mode="floor")
        return LoRA({k: v[index] for k, v in self.A.items()}, {k: v[index] for k, v in self.B.items()},
                    self.backbone, dict(self.meta))

    def unbind(self) -> list[LoRA]:
        return [self[i] for i in range(self.batch_size)]

    def per_sample(self, owner: torch.Tensor) -> LoRA:
        """The LoRA of each sample, owner (B,) = which of this batch's LoRAs each sample uses: `repeat_each` where
        the samples come as consecutive groups of one size (owner = arange(B) // n), else `take(owner)`. Give
        owner on the CPU, as collation builds it: the check then costs no wait on the LoRA's device."""
        U, B = self.batch_size, owner.shape[0]
        if B % U == 0 and torch.equal(owner.cpu(), torch.arange(B) // (B // U)):
            return self.repeat_each(B // U)
        return self.take(owner.to(next(iter(self.A.values())).device))

    def repeat_each(self, n: int) -> LoRA:
        """This batch of U LoRAs for U·n samples, LoRA i serving samples i·n .. i·n+n-1: what `take` with
        arange(U·n) // n gives, but the hooks apply each LoRA to its n samples as one matmul instead of copying
        it n times (G targets sharing one predicted LoRA in training, a style's rows in per-style optimisation:
        ~5 % of a toy training step, docs/results.md). Differentiable; the same outputs as `take`."""
        if not self.batched:
            raise ValueError("repeat_each needs a batched LoRA (one per group); use expand for one LoRA")
        if n < 1:
            raise ValueError(f"repeat_each needs n >= 1, got {n}")
        return LoRA(self.A, self.B, self.backbone, dict(self.meta), self.rows_per_lora * n)

    def expand(self, n: int) -> LoRA:
        """A batch of n copies (for broadcasting one LoRA over a batch)."""
        one = self[0] if self.batched and self.batch_size == 1 else self
        if one.batched:
            raise ValueError(f"cannot expand a batch of {self.batch_size} LoRAs to {n}")
        return LoRA({k: v.unsqueeze(0).expand(n, *v.shape) for k, v in one.A.items()},
                    {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in one.B.items()}, self.backbone,
                    dict(self.meta))

    def delta(self, name: str) -> torch.Tensor:
        """ΔW = B·A for one layer: [out, in] (or [B, out, in])."""
        return self.B[name] @ self.A[name]

    def norms(self) -> dict[str, float]:
        """Frobenius norm of ΔW per layer (catalogued with produced LoRAs)."""
        return {k: float(torch.linalg.matrix_norm(self.delta(k).float()).mean()) for k in self.names}

    # ---------- combining ----------
    @staticmethod
    def stack(loras: list[LoRA]) -> LoRA:
        """Batch several LoRAs over the union of their layers. A LoRA without a layer gets a zero one there (adds
        nothing, exactly as its hook would skip the layer); ranks are zero-padded per layer to the largest."""
        # a `repeat_each` LoRA counts as the samples it serves, as its hooks apply it
        items = [x for lo in loras for x in (_per_sample_items(lo) if lo.batched else [lo])]
        names = _union_names(items)  # order may differ (files list keys sorted)
        A, B = {}, {}
        for k in names:
            have = [x for x in items if k in x.A]
            r = max(x.A[k].shape[0] for x in have)
            a, b = have[0].A[k][:0], have[0].B[k][:, :0]  # rank 0: what a LoRA without the layer pads up from
            A[k] = torch.stack([_pad_rank(x.A.get(k, a), r, 0) for x in items])  # (B, r, in)
            B[k] = torch.stack([_pad_rank(x.B.get(k, b), r, 1) for x in items])  # (B, out, r)
        return LoRA(A, B, items[0].backbone, dict(items[0].meta))

    @staticmethod
    def mix(loras: list[LoRA], weights: list[float]) -> LoRA:
        """Exact weighted sum in weight space, ΔW = Σ w_i·B_i·A_i, by concatenating ranks, over the union of the
        LoRAs' layers (a LoRA without a layer contributes zero blocks there, so every layer has rank Σr_i).

        Zero weights are dropped, so mixing with (1, 0) returns the first LoRA itself."""
        if len(loras) != len(weights) or not loras:
            raise ValueError("mix needs one weight per LoRA")
        weights = [require_finite(w, f"mixing weight {i + 1}") for i, w in enumerate(weights)]
        kept = [(lo, w) for lo, w in zip(loras, weights) if w != 0]
        if not kept:
            return loras[0].scaled(0.0)
        A, B = {}, {}
        for k in _union_names([lo for lo, _ in kept]):
            a, b = next((lo.A[k], lo.B[k]) for lo, _ in kept if k in lo.A)
            A[k] = torch.cat([lo.A[k] if k in lo.A else a.new_zeros(*a.shape[:-2], lo.rank, a.shape[-1])
                              for lo, _ in kept], dim=-2)  # (Σr, in)
            B[k] = torch.cat([lo.B[k] * w if k in lo.B else b.new_zeros(*b.shape[:-1], lo.rank)
                              for lo, w in kept], dim=-1)  # (out, Σr)
        meta = dict(kept[0][0].meta, mixed=json.dumps([float(w) for _, w in kept]))
        return LoRA(A, B, kept[0][0].backbone, meta)

    # ---------- files ----------
    def save(self, path: str | os.PathLike, prefix: str | None = None, format: str = "diffusers",
             backbone=None) -> Path:
        """Write a safetensors file atomically in the key layout of `format`'s consumer (i2l.model.lora_formats):
        diffusers `<prefix>.<module>.lora_A.weight` (prefix: the pipeline component; default the backbone's, else
        "transformer"), diffsynth `<module>.lora_A.weight`, comfyui `diffusion_model.<module>.lora_A.weight`, with
        the consumer's module names from `backbone` (a Backbone or its class: `lora_names(format)`). The other
        formats record themselves in the metadata (`i2l.lora_format`); a diffusers file is what it always was."""
        if self.batched:
            raise ValueError("save one LoRA at a time: index the batch first (lora[i])")
        check_format(format)
        if prefix is None:
            prefix = backbone.lora_prefix if backbone is not None else "transformer"
        prefix = FIXED_PREFIX.get(format, prefix)
        table = backbone.lora_names(format) if backbone is not None else ()
        layers, record = to_file_layers(self.A, self.B, table)
        path, p = Path(path), f"{prefix}." if prefix else ""
        tensors = {}
        for k, (a, b) in layers.items():
            tensors[f"{p}{k}.lora_A.weight"] = a.detach().contiguous().cpu()
            tensors[f"{p}{k}.lora_B.weight"] = b.detach().contiguous().cpu()
        meta = {"format": "pt", "i2l.format_version": FORMAT_VERSION, "i2l.backbone": self.backbone,
                "i2l.rank": str(self.rank), "i2l.alpha": "folded into lora_B (scaling 1)",
                "i2l.meta": json.dumps(self.meta)}
        if format != "diffusers":
            meta["i2l.lora_format"] = format
            if record:
                meta["i2l.layers"] = json.dumps(record)
        with atomic_path(path) as tmp:  # never a half-written LoRA file, nor one temp name for two writers
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backbone=None, device="cpu") -> LoRA:
        """Read a LoRA file (i2l's own in any of its formats, or PEFT/diffusers keys) and check it against
        `backbone` if given. i2l's diffsynth and comfyui files record their format and renamed or fused layers in
        their metadata, and read back to the LoRA that was saved.

        With a backbone, other trainers' key layouts (kohya, ai-toolkit / BFL names) are converted as the
        pipeline's own loader converts them (`Backbone.convert_lora_keys`); their α/r scales (`.alpha` keys,
        diffusers' `lora_adapter_metadata`) are folded into lora_B, so the LoRA changes the model as diffusers'
        `load_lora_weights` makes that file change it."""
        path = Path(path)
        require_regular_file(path, "LoRA file", give="a .safetensors LoRA file")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            # LoRA pieces only: a model file passed by mistake fails fast instead of being read whole
            tensors = {k: f.get_tensor(k) for k in f.keys() if "lora" in k or k.endswith(".alpha")}  # noqa: SIM118
        # the file's own keys in the message; α may be stored as an integer, the matrices may not
        check_weights({k: t if not k.endswith(".alpha") else t.double() for k, t in tensors.items()}, str(path))
        if backbone is not None and "i2l.format_version" not in meta:  # i2l's own files say their layout
            tensors = backbone.convert_lora_keys(tensors, str(path))
        A, B, alphas = {}, {}, {}
        for key, t in tensors.items():
            name, kind = _parse_key(key)
            if kind is not None:
                {"A": A, "B": B, "alpha": alphas}[kind][name] = t
        if "i2l.lora_format" in meta and set(A) == set(B):  # i2l's diffsynth / comfyui file: names back to i2l's
            A, B = from_file_layers(A, B, meta, str(path))
        if not A or set(A) != set(B):
            hint = ("" if backbone is not None or not any(k.startswith("lora_unet_") or ".lora_down." in k
                                                           for k in tensors)
                    else " in a layout i2l reads; kohya-style keys are converted when the backbone is given")
            raise ValueError(f"{path}: not a LoRA file (no matching lora_A/lora_B pairs{hint})")
        _check_pairs(A, B, str(path))
        # i2l's files have the scale folded in already; other trainers' files scale by alpha/r at run time
        for k, s in _alpha_scales(A, alphas, meta.get("lora_adapter_metadata")).items():
            if not math.isfinite(s) or abs(s) > MAX_ABS_WEIGHT:  # json reads NaN/Infinity in adapter metadata
                raise ValueError(f"{path}: {k} has alpha/rank scale {s:g}: not a finite scale of a LoRA")
            B[k] = B[k] * s
        lora = cls(A, B, meta.get("i2l.backbone", ""), json.loads(meta.get("i2l.meta", "{}") or "{}"))
        if backbone is not None:
            check_compatible(lora, backbone, source=str(path))
        return lora


_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")


def _union_names(loras: list[LoRA]) -> list[str]:
    """Every layer any of the LoRAs adapts, in order of first appearance."""
    return list(dict.fromkeys(k for lo in loras for k in lo.names))


def _check_pairs(A: dict[str, torch.Tensor], B: dict[str, torch.Tensor], source: str) -> None:
    """Each layer of a file: lora_A (r, in), lora_B (out, r), r, in, out >= 1, with or without a backbone: rank 0
    would silently change nothing (PEFT refuses it too), a wrong shape fail only at sampling, far from the file."""
    bad = [f"{k}: lora_A {tuple(A[k].shape)}, lora_B {tuple(B[k].shape)}" for k in A
           if not _makes_product(A[k], B[k], dims=(2,)) or 0 in (*A[k].shape, *B[k].shape)]
    if bad:
        raise ValueError(f"{source}: {len(bad)} layer(s) are not a LoRA pair lora_A (r, in), lora_B (out, r) with "
                         f"rank r >= 1: {'; '.join(bad[:3])}")


def _makes_product(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...] = (2, 3)) -> bool:
    """Whether lora_A a ([B,] r, in) and lora_B b ([B,] out, r) make B·A: one rank, `dims` dimensions each."""
    return a.dim() == b.dim() and a.dim() in dims and a.shape[-2] == b.shape[-1]


def _pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Zero-pad the rank dimension of A ([r', in], dim 0) or B ([out, r'], dim 1) to r: zeros add nothing."""
    extra = r - t.shape[dim]
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _host_copy(tensors: list[torch.Tensor], dtype: torch.dtype, pin: bool) -> list[torch.Tensor]:
    """Tensors (any device, any layout) -> CPU tensors of `dtype` with the same shapes, all views of one buffer
    filled by one copy: convert and pack on the source device, copy once, wait for it."""
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])  # (Σ numel,) on the source device
    host = torch.empty(flat.shape, dtype=dtype, pin_memory=pin)
    host.copy_(flat, non_blocking=pin)  # asynchronous only into page-locked memory
    if pin:
        torch.cuda.current_stream(flat.device).synchronize()
    return [part.view(t.shape) for part, t in zip(host.split([t.numel() for t in tensors]), tensors)]


def _parse_key(key: str) -> tuple[str, str | None]:
    """A file key -> (module name, "A" | "B" | "alpha" | None for keys that are no LoRA matrix)."""
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    if key.endswith(".alpha"):  # kohya / ai-toolkit: one scalar α per module
        return key[: -len(".alpha")], "alpha"
    for kind, marks in (("A", (".lora_A.default.weight", ".lora_A.weight")),
                        ("B", (".lora_B.default.weight", ".lora_B.weight"))):
        for m in marks:
            if key.endswith(m):
                return key[: -len(m)], kind
    return key, None


def _alpha_scales(A: dict[str, torch.Tensor], alphas: dict[str, torch.Tensor],
                  adapter_meta: str | None) -> dict[str, float]:
    """The scale diffusers' `load_lora_weights` gives each module, for the modules where it is not 1.

    `<module>.alpha` keys: α/r, folded into the weights on load (diffusers' non-diffusers-format conversion).
    `lora_adapter_metadata` (what diffusers' `save_lora_weights` writes: the PEFT LoraConfig, keys prefixed by
    `transformer.`): lora_alpha/r with PEFT's per-module rank_pattern / alpha_pattern, or α/√r with use_rslora."""
    scales = {k: float(alphas[k]) / A[k].shape[0] for k in A if k in alphas}
    cfg = json.loads(adapter_meta) if adapter_meta else {}
    if any(k.startswith("transformer.") for k in cfg):  # a pipeline's file: the transformer's config
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if "lora_alpha" in cfg or "r" in cfg:
        for k in A:
            r = _pattern_value(cfg.get("rank_pattern") or {}, k, cfg.get("r", 8))
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, k, cfg.get("lora_alpha", 8))
            scales[k] = scales.get(k, 1.0) * alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    return {k: s for k, s in scales.items() if s != 1.0}


def _per_sample_items(lora: LoRA) -> list[LoRA]:
    """A batched LoRA as one LoRA per sample it serves (a `repeat_each` LoRA's items repeated)."""
    items = lora.unbind()
    return [x for x in items for _ in range(lora.rows_per_lora)]


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern look-up (`peft.utils.other.get_pattern_key`): the first pattern that matches
    the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def check_compatible(lora: LoRA, backbone, source: str = "LoRA") -> None:
    """Raise a ValueError naming every layer whose key or shape does not fit the backbone."""
    targets = backbone.lora_targets()  # name -> (in, out)
    problems = []
    if lora.backbone and backbone.backbone_id and lora.backbone.split("@")[0] != backbone.backbone_id.split("@")[0]:
        problems.append(f"made for backbone {lora.backbone!r}, this is {backbone.backbone_id!r}")
    unknown = [k for k in lora.names if k not in targets]
    modules = dict(backbone.transformer.named_modules()) if unknown else {}
    if missing := [k for k in unknown if k not in modules]:
        problems.append(f"{len(missing)} layer(s) not in the backbone, e.g. {missing[:3]}")
    if elsewhere := [k for k in unknown if k in modules]:  # e.g. a kohya file that also adapts img_in
        problems.append(f"{len(elsewhere)} layer(s) of the backbone that i2l does not adapt, e.g. {elsewhere[:3]} "
                        f"(it adapts {len(targets)} layers: backbone.targets)")
    for k in lora.names:
        a, b = lora.A[k], lora.B[k]
        if not _makes_product(a, b):
            problems.append(f"{k}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make B·A "
                            f"(A is [r, in], B is [out, r], with one rank r)")
        elif k in targets:
            d_in, d_out = targets[k]
            if a.shape[-1] != d_in or b.shape[-2] != d_out:
                problems.append(f"{k}: LoRA is {tuple(b.shape[-2:])}x{tuple(a.shape[-2:])}, "
                                f"layer is in={d_in} out={d_out}")
    if problems:
        raise ValueError(f"{source} does not fit backbone {backbone.backbone_id}: " + "; ".join(problems[:6]))


def zero_lora(targets: dict[str, tuple[int, int]], rank: int, backbone: str = "") -> LoRA:
    """A LoRA whose B is zero (a no-op), with A small random: the usual trainable initialisation."""
    g = torch.Generator().manual_seed(0)
    A = {k: torch.randn(rank, i, generator=g) / i**0.5 for k, (i, o) in targets.items()}
    B = {k: torch.zeros(o, rank) for k, (i, o) in targets.items()}
    return LoRA(A, B, backbone)
