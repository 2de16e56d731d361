"""The adapter baseline (IP-Adapter-like): the same frozen encoder's patch tokens become M extra context
tokens appended to the prompt's, instead of a LoRA; trained through the frozen backbone on the predictor's
tuples with its budget. Shapes: B batch, S = N·P image tokens, D encoder width, M context tokens, H hidden,
E text width, L text tokens.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from i2l.backbones.base import Backbone, Cond
from i2l.config import Config
from i2l.infer.guidance import sample
from i2l.io import atomic_path, write_text_atomic
from i2l.model.flow_matching import fm_loss, mixed_precision
from i2l.train.step import TrainStep, WarmupCosine, step_generator, timestep_sampler

WEIGHTS_FILE = "adapter.safetensors"
INFO_FILE = "adapter.json"
MAX_REFS = 64


class AdapterProjector(nn.Module):
    """Learned queries + image tokens -> single-stream transformer (the predictor's) -> M context tokens."""

    def __init__(self, token_dim: int, text_dim: int, tokens: int = 8, hidden: int = 128, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        self.dims = {"token_dim": token_dim, "text_dim": text_dim, "tokens": tokens, "hidden": hidden,
                     "depth": depth, "heads": heads}
        self.in_proj = nn.Linear(token_dim, hidden)
        self.ref_embed = nn.Embedding(MAX_REFS, hidden)  # which reference a token came from
        self.query = nn.Parameter(torch.randn(tokens, hidden) * 0.02)  # (M, H)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=0.0,
                                       batch_first=True, norm_first=True, activation="gelu")
            for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, text_dim)
        # zero output: the untrained adapter appends constant tokens that carry no reference information
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, ref_index: torch.Tensor) -> torch.Tensor:
        """tokens (B, S, D), keep (B, S) bool, ref_index (B, S) -> context tokens (B, M, E)."""
        B, M = tokens.shape[0], self.query.shape[0]
        z = self.in_proj(tokens) + self.ref_embed(ref_index)  # (B, S, H)
        x = torch.cat([self.query.unsqueeze(0).expand(B, -1, -1), z], dim=1)  # (B, M+S, H)
        pad = torch.cat([keep.new_zeros(B, M), ~keep], dim=1)  # (B, M+S): True = ignore
        for blk in self.blocks:
            x = blk(x, src_key_padding_mask=pad)  # (B, M+S, H)
        return self.out(self.norm(x[:, :M]))  # (B, M, E)


def build_adapter(cfg: Config, token_dim: int, text_dim: int) -> AdapterProjector:
    """The projector sized like the predictor's aggregator unless eval.adapter_* says otherwise."""
    e, p = cfg.eval, cfg.predictor
    torch.manual_seed(cfg.train.seed)
    return AdapterProjector(token_dim, text_dim, e.adapter_tokens, e.adapter_hidden or p.hidden,
                            e.adapter_depth or p.depth, e.adapter_heads or p.heads)


def adapter_tokens(adapter: AdapterProjector, encoder, refs: torch.Tensor,
                   n_refs: torch.Tensor | None = None) -> torch.Tensor:
    """refs (B, N, 3, H, W) in [-1, 1] (padded), n_refs (B,) -> context tokens (B, M, E)."""
    if refs.dim() == 4:
        refs = refs.unsqueeze(0)  # one sample of N references
    if n_refs is None:
        n_refs = torch.full((refs.shape[0],), refs.shape[1], dtype=torch.long)
    tokens, keep, ref_index = encoder.encode_refs(refs, n_refs)  # (B, S, D), (B, S), (B, S)
    p = next(adapter.parameters())
    return adapter(tokens.to(p.dtype), keep, ref_index)


def with_context(cond: Cond, extra: torch.Tensor) -> Cond:
    """Append context tokens extra (B, M, E) (or (1, M, E), broadcast) to the prompt's (B, L, E)."""
    B = len(cond)
    if extra.shape[0] == 1 and B != 1:
        extra = extra.expand(B, -1, -1)
    if extra.shape[0] != B:
        raise ValueError(f"{B} prompts but {extra.shape[0]} sets of adapter tokens")
    embeds = torch.cat([cond.embeds, extra.to(cond.embeds)], dim=1)  # (B, L+M, E)
    mask = None if cond.mask is None else torch.cat(
        [cond.mask, cond.mask.new_ones(B, extra.shape[1])], dim=1)  # (B, L+M)
    return Cond(embeds, mask)


class ConditionedBackbone:
    """The backbone seen with adapter tokens appended to every prompt: usable wherever a Backbone is read
    (held-out FM loss, sampling). extra: (1, M, E) for one style, or (B, M, E) for B prompts."""

    def __init__(self, backbone: Backbone, extra: torch.Tensor):
        self.backbone, self.extra = backbone, extra

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return with_context(self.backbone.encode_prompts(prompts), self.extra)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, lora=None, strength: float = 1.0):
        return self.backbone.velocity(x_t, t, cond, lora, strength)


@torch.no_grad()
def generate_with_adapter(backbone: Backbone, extra: torch.Tensor, prompts: list[str], noise: torch.Tensor,
                          guidance: float, steps: int, negative_prompt: str = "") -> torch.Tensor:
    """Sample latents (B, *latent) for prompts with adapter tokens extra (B, M, E). CFG keeps the image tokens
    on both branches (only the prompt is guided), as plain CFG keeps a LoRA on both branches."""
    view = ConditionedBackbone(backbone, extra.to(backbone.device, backbone.dtype))
    cond = view.encode_prompts(prompts)
    neg = view.encode_prompts([negative_prompt] * len(prompts))
    return sample(view, cond, neg, None, None, guidance, steps, noise=noise)


def train_adapter(cfg: Config, data_dir: str | Path, out_dir: str | Path, steps: int | None = None,
                  progress: bool = True, device: str | None = None) -> dict:
    """Train the projector for cfg.train.steps x cfg.train.batch_size tuples (the predictor's budget, the same
    noise and timesteps per step); write adapter.safetensors + adapter.json to out_dir."""
    from tqdm import tqdm

    from i2l.backbones import load_backbone
    from i2l.data.tuples import TupleStream, collate_group_sets
    from i2l.model.encoder import load_encoder
    from i2l.train.loop import FrozenCaches, reference_tokens

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    steps = steps or cfg.eval.baseline_steps or cfg.train.steps
    backbone = load_backbone(cfg).to(device)
    encoder = load_encoder(cfg.encoder).to(device)
    with torch.no_grad():
        text_dim = backbone.encode_prompts([""]).embeds.shape[-1]
    adapter = build_adapter(cfg, encoder.dim, text_dim).to(device)
    dtype = next(adapter.parameters()).dtype
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    trainer = TrainStep(opt, cfg.train.grad_clip, adapter.parameters(), WarmupCosine(opt, steps, cfg.train.warmup))
    # the predictor's batches: G = train.targets_per_lora targets share one reference set, so the frozen encoder
    # runs once per set (and, through the caches, once per reference image and prompt while they stay held)
    stream = iter(TupleStream(data_dir, "train", cfg.predictor.max_refs, cfg.train.seed,
                              targets_per_lora=cfg.train.targets_per_lora))
    caches = FrozenCaches.build(cfg, backbone, encoder) if cfg.train.cache_frozen else None
    bs, t0 = cfg.train.batch_size, time.time()
    timesteps = timestep_sampler(cfg, backbone)  # the predictor's law
    bar = tqdm(range(steps), desc="train adapter", disable=not progress)
    for step in bar:
        targets, prompts, sets, owner = collate_group_sets(list(itertools.islice(stream, bs)),
                                                           cfg.backbone.image_size)
        g = step_generator(cfg.train.seed, step)  # the predictor's noise and timesteps at this step
        with mixed_precision(device, cfg.backbone.dtype):
            with torch.no_grad():  # the frozen text encoder, backbone codec and reference encoder
                cond = caches.encode_prompts(backbone, prompts) if caches else backbone.encode_prompts(prompts)
                x1 = backbone.encode_images(targets.to(device))
                tokens, keep, ref_index = reference_tokens(cfg, encoder, sets, device, caches.refs if caches else None)
            extra = adapter(tokens.to(dtype), keep, ref_index)  # (U, M, E), one per reference set
            cond = with_context(cond, extra[owner.to(device)])  # (B, L + M, E)
            loss = fm_loss(backbone, x1, cond, generator=g, timesteps=timesteps)
        trainer.backward(loss)  # outside autocast, as PyTorch's AMP recipe has it
        rec = trainer.step(loss)
        bar.set_postfix(loss=f"{rec['loss']:.4f}")
    secs = time.time() - t0
    info = {"steps": steps, "batch_size": bs, "seconds": secs, **trainer.summary(),
            "backbone_id": backbone.backbone_id, "encoder_id": encoder.encoder_id, "dims": adapter.dims,
            **(caches.stats() if caches else {})}
    save_adapter(adapter, out_dir, {**info, "curve": trainer.curve, "config": cfg.to_dict()})
    return {"dir": str(out_dir), **info}


def save_adapter(adapter: AdapterProjector, out_dir: str | Path, info: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:  # weights first; the info file marks the directory complete
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}, str(tmp))
    write_text_atomic(out / INFO_FILE, json.dumps(info, indent=2, default=str))
    return out


def load_adapter(out_dir: str | Path, backbone: Backbone | None = None, encoder=None,
                 device: str = "cpu") -> tuple[AdapterProjector, dict]:
    """A trained adapter and its info; refused when made for another backbone or encoder."""
    out = Path(out_dir)
    if not (out / INFO_FILE).is_file() or not (out / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no trained adapter in {out}: run `i2l train-adapter --out {out}` first")
    info = json.loads((out / INFO_FILE).read_text())
    for what, have, key in (("backbone", backbone, "backbone_id"), ("encoder", encoder, "encoder_id")):
        if have is not None and getattr(have, key) != info[key]:
            raise ValueError(f"adapter {out} was trained for {what} {info[key]!r}, not "
                             f"{getattr(have, key)!r}: retrain it with `i2l train-adapter`")
    adapter = AdapterProjector(**info["dims"])
    adapter.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    return adapter.to(device).eval().requires_grad_(False), info
