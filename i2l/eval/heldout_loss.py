"""Held-out flow-matching loss: backbone + LoRA on unseen styles, on a FIXED grid of noises and timesteps so that
numbers compare across methods (base, gray-image LoRA, i2L with 1 / 4 references, per-style LoRAs at several
step budgets, a wrong-style LoRA as a sanity check)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from i2l.backbones.base import Backbone
from i2l.data.images import decode, to_tensor
from i2l.data.shards import iter_rows
from i2l.model.flow_matching import fm_loss
from i2l.model.lora import LoRA


@dataclass
class ValSample:
    sample_id: str
    style_id: str
    prompt: str
    style: str
    target: object  # PIL image
    refs: list  # PIL images of the same style, other contents
    ref_prompts: list[str]


def load_val_samples(data_dir: str | Path, limit: int | None = None, one_per_style: bool = True) -> list[ValSample]:
    """The validation manifest's samples (1 prompt + 4 references each) with their images, streamed by id."""
    path = Path(data_dir) / "val_manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no validation manifest at {path}: run `i2l prepare` first")
    entries, seen = [], set()
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if one_per_style and e["style_id"] in seen:
            continue
        seen.add(e["style_id"])
        entries.append(e)
        if limit and len(entries) >= limit:
            break
    wanted = {i for e in entries for i in [e["target_id"], *e["reference_ids"]]}
    rows = {r["id"]: r for r in iter_rows(data_dir, "val", columns=("id", "image", "content")) if r["id"] in wanted}
    missing = wanted - set(rows)
    if missing:
        raise ValueError(f"validation manifest names {len(missing)} ids missing from the val shards, "
                         f"e.g. {sorted(missing)[:3]}")
    return [ValSample(e["sample_id"], e["style_id"], e["prompt"], e.get("style", ""),
                      decode(rows[e["target_id"]]["image"]), [decode(rows[i]["image"]) for i in e["reference_ids"]],
                      [rows[i]["content"] for i in e["reference_ids"]]) for e in entries]


def heldout_loss(backbone: Backbone, sample: ValSample, lora: LoRA | None, image_size: int, timesteps: int,
                 noise_seeds: int, index: int = 0) -> float:
    """Mean FM loss over a fixed (noise seed x timestep) grid; the grid depends only on the sample index."""
    return heldout_loss_by_t(backbone, sample, lora, image_size, timesteps, noise_seeds, index)[0]


@torch.no_grad()
def heldout_loss_by_t(backbone: Backbone, sample: ValSample, lora: LoRA | None, image_size: int, timesteps: int,
                      noise_seeds: int, index: int = 0) -> tuple[float, list[float]]:
    """`heldout_loss` and the loss at each t of its grid, t_k = (k + 0.5) / timesteps ascending (t = 0 is pure
    noise, t = 1 the image), averaged over the noise seeds: where along the noise levels a method gains."""
    x1 = backbone.encode_images(to_tensor([sample.target], image_size).to(backbone.device))  # (1, *latent)
    n = timesteps * noise_seeds
    t = ((torch.arange(timesteps) + 0.5) / timesteps).repeat(noise_seeds).to(backbone.device)  # (n,)
    noise = torch.cat([torch.randn(x1.shape, generator=torch.Generator().manual_seed(1000 * index + s))
                       .expand(timesteps, *x1.shape[1:]) for s in range(noise_seeds)]).to(x1)  # (n, *latent)
    cond = backbone.encode_prompts([sample.prompt] * n)
    if lora is not None and not lora.batched:
        lora = lora.to(backbone.device).expand(n)
    per = fm_loss(backbone, x1.expand(n, *x1.shape[1:]), cond, lora, t=t, noise=noise, reduce=False)  # (n,)
    # the mean as fm_loss reduces it (the figures recorded before the breakdown are unchanged to the bit)
    return float(per.mean()), per.float().view(noise_seeds, timesteps).mean(0).tolist()


def mean_loss_by_method(rows: list[dict]) -> list[dict]:
    """Mean loss and conditioning time per method (rows of i2l.eval.methods.heldout_losses), highest loss first."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    out = [{"method": m, "loss": sum(r["loss"] for r in rs) / len(rs),
            "wall_s": sum(r["wall_s"] for r in rs) / len(rs), "styles": len(rs)} for m, rs in by.items()]
    return sorted(out, key=lambda r: r["loss"], reverse=True)


def format_loss_table(summary: list[dict]) -> str:
    """mean_loss_by_method as a text table, each loss also relative to the base model's."""
    base = next((r["loss"] for r in summary if r["method"] == "base"), None)
    lines = [f"{'method':<22}{'held-out FM loss':>18}{'vs base':>10}{'LoRA time (s)':>15}{'styles':>8}"]
    for r in summary:
        rel = f"{100 * (r['loss'] / base - 1):+.1f}%" if base else ""
        lines.append(f"{r['method']:<22}{r['loss']:>18.4f}{rel:>10}{r['wall_s']:>15.4f}{r['styles']:>8}")
    return "\n".join(lines)
