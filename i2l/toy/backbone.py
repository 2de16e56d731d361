"""The toy backbone: diffusers' own Flux2Transformer2DModel (tiny config) in pixel space through a patch
codec, with a tiny text encoder over the toy vocabulary. Pretrained by i2l on the toy world.

Shapes: B batch, T = (H/p)·(W/p) image tokens of C = 3·p² channels, L text tokens of D channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import Flux2Transformer2DModel
from diffusers.loaders import Flux2LoraLoaderMixin
from safetensors.torch import load_file, save_file
from torch import nn

from i2l.backbones.base import Backbone, Cond
from i2l.config import BackboneConfig
from i2l.io import atomic_files
from i2l.toy.words import build_vocab, tokenize_words


class ToyTextEncoder(nn.Module):
    """Word embeddings + positions + one transformer layer: (B, L) ids -> (B, K, D), the first K = out_tokens
    positions. Words past K still reach the context through that layer's attention: a prompt may name a style
    in more words than the backbone's context holds, and every backbone step pays only for K text tokens."""

    def __init__(self, vocab: list[str], dim: int, max_tokens: int, out_tokens: int | None = None):
        super().__init__()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        self.out_tokens = min(out_tokens or max_tokens, max_tokens)
        self.embed = nn.Embedding(len(vocab), dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=dim * 2, dropout=0.0,
                                                batch_first=True, norm_first=True)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_tokens, dtype=torch.long)  # 0 = <pad>
        for i, p in enumerate(prompts):
            words = tokenize_words(p)
            if len(words) > self.max_tokens:
                raise ValueError(f"prompt has {len(words)} words; the toy text encoder takes at most "
                                 f"{self.max_tokens}: {p!r}")
            for j, w in enumerate(words):
                ids[i, j] = self.index.get(w, 1)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, L, D)
        return self.layer(h)[:, : self.out_tokens]  # (B, K, D)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, T, 3·p·p), row-major over patches."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, size: int) -> torch.Tensor:
    """(B, T, 3·p·p) -> (B, 3, H, W)."""
    B = tokens.shape[0]
    h = w = size // p
    x = tokens.reshape(B, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, 3, h, p, w, p)
    return x.reshape(B, 3, size, size)


def position_width(channels: bool, octaves: int) -> int:
    """Input channels a token's place takes (position_features): 0, 2 (row, col), or 4 per octave."""
    if not channels:
        return 0
    return 4 * octaves if octaves else 2


def position_features(n: int, octaves: int) -> torch.Tensor:
    """What each token of an n x n grid carries about its place, row-major: (T, position_width(True, octaves)).
    Its (row, col) in [-1, 1], then per octave k a period of 2^(k+1) tokens: cos of row and col (k = 0: a token's
    parity, whose sine is 0 at every token), cos and sin of both (k > 0). A wide toy pattern repeats every 2
    tokens; RoPE turns at most 1 radian per token, too slow to make tokens 2 apart alike and the one between unlike."""
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    r, c = rows.flatten().float(), cols.flatten().float()  # (T,)
    feats = [r / max(n - 1, 1) * 2 - 1, c / max(n - 1, 1) * 2 - 1]  # (T,) each
    for k in range(octaves):
        w = torch.pi / 2**k  # radians per token
        feats += [torch.cos(w * r), torch.cos(w * c)] + ([torch.sin(w * r), torch.sin(w * c)] if k else [])
    return torch.stack(feats, -1)  # (T, P)


def octaves_of(extra: int) -> int | None:
    """The octaves of a saved transformer whose inputs have `extra` channels beyond the pixels' (None: no
    position channels; a count position_width cannot give raises)."""
    if extra == 0:
        return None
    if extra == 2 or (extra > 0 and extra % 4 == 0):
        return extra // 4
    raise ValueError(f"the toy transformer takes {extra} input channels beyond its pixels; position channels take "
                     "2, or 4 per octave: not a toy backbone that i2l wrote")


def text_ids(L: int, device) -> torch.Tensor:
    """Rope ids (0, 0, 0, i) of L text tokens: per call, so contexts of any length work."""
    z = torch.zeros(L, dtype=torch.long, device=device)
    return torch.stack([z, z, z, torch.arange(L, device=device)], -1)  # (L, 4)


def transformer_config(cfg: BackboneConfig) -> dict:
    """The toy transformer's diffusers config, from the preset's fields."""
    head_dim = cfg.dim // cfg.heads
    if head_dim % 4:
        raise ValueError("backbone.dim / backbone.heads must be divisible by 4 (4 rope axes)")
    return {
        # position channels: each token also carries its place (position_features) as input channels; the output
        # stays the 3·p² pixel channels (out_channels)
        "patch_size": 1, "in_channels": 3 * cfg.patch**2 + position_width(cfg.position_channels, cfg.position_octaves),
        "out_channels": 3 * cfg.patch**2, "num_layers": cfg.double_layers,
        "num_single_layers": cfg.single_layers, "attention_head_dim": head_dim, "num_attention_heads": cfg.heads,
        "joint_attention_dim": cfg.text_dim, "timestep_guidance_channels": 64, "mlp_ratio": 3.0,
        "axes_dims_rope": (head_dim // 4,) * 4, "guidance_embeds": False,
    }


def build_transformer(cfg: BackboneConfig) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(**transformer_config(cfg))


class ToyBackbone(Backbone):
    kind = "toy"
    transformer_class = Flux2Transformer2DModel
    lora_loader = Flux2LoraLoaderMixin  # its transformer is diffusers' Flux2Transformer2DModel

    def __init__(self, cfg: BackboneConfig, transformer: Flux2Transformer2DModel, text_encoder: ToyTextEncoder):
        super().__init__(cfg.targets)
        self.cfg = cfg
        self.transformer = transformer
        self.text_encoder = text_encoder
        c = transformer.config
        self.backbone_id = (f"toy-flux2:c{c.in_channels}-d{c.num_attention_heads * c.attention_head_dim}"
                            f"-l{c.num_layers}-s{c.num_single_layers}")
        n = cfg.image_size // cfg.patch
        rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        zeros = torch.zeros(n * n, dtype=torch.long)
        self.img_ids = torch.stack([zeros, rows.flatten(), cols.flatten(), zeros], -1)  # (T, 4)
        # RoPE gives attention relative positions only; with position channels a token also knows where it is, so
        # "at the top left" and a pattern's phase need not be inferred from the grid's edges (None: saved without)
        octaves = octaves_of(c.in_channels - c.out_channels)
        self.positions = None if octaves is None else position_features(n, octaves)  # (T, 2 or 4·octaves)

    @classmethod
    def architecture(cls, cfg: BackboneConfig) -> dict:
        """The transformer's config without weights: a saved toy backbone's if there is one, else the preset's."""
        saved = Path(cfg.path, "transformer")
        return Flux2Transformer2DModel.load_config(saved) if saved.is_dir() else transformer_config(cfg)

    @classmethod
    def random(cls, cfg: BackboneConfig, seed: int = 0) -> ToyBackbone:
        """Random weights in the preset's own architecture (a saved toy backbone is not read)."""
        return new_toy_backbone(cfg, build_vocab(["one small circle at the top left"]), seed=seed)

    def modules(self):
        return [self.transformer, self.text_encoder]

    def _encode_prompts(self, prompts: list[str]) -> Cond:
        ids = self.text_encoder.token_ids(list(prompts)).to(self.device)
        return Cond(self.text_encoder(ids))  # (B, L, D)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images  # pixel space: the latent is the image in [-1, 1]

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def latent_shape(self, image_size: int) -> tuple[int, ...]:
        return (3, image_size, image_size)

    def _velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        tokens = patchify(x_t, self.cfg.patch)  # (B, T, C) in the backbone's dtype
        if self.positions is not None:
            pos = self.positions.to(tokens).expand(tokens.shape[0], -1, -1)  # (B, T, P)
            tokens = torch.cat([tokens, pos], -1)  # (B, T, C + P)
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=cond.embeds,
            # diffusers' Flux2 takes sigma = 1 - t (1 = pure noise) and predicts noise - data = -(x1 - x0)
            timestep=(1.0 - t).to(tokens.dtype), img_ids=self.img_ids.to(tokens.device),
            txt_ids=text_ids(cond.embeds.shape[1], tokens.device), return_dict=False,
        )[0]  # (B, T, C)
        return -unpatchify(out, self.cfg.patch, x_t.shape[-1])  # (B, 3, H, W)

    # ----- files -----
    def save(self, out_dir: str | Path) -> Path:
        """diffusers `save_pretrained` layout for the transformer; safetensors + json for the text encoder."""
        out = Path(out_dir)
        meta = {k: getattr(self.cfg, k) for k in ("image_size", "patch", "dim", "heads", "double_layers",
                                                   "single_layers", "text_dim", "max_text_tokens",
                                                   "text_context_tokens")}
        with atomic_files(out) as tmp:  # a kill mid-save leaves no half-written file at a final name
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            te = tmp / "text_encoder"
            te.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.text_encoder.state_dict().items()},
                      str(te / "model.safetensors"))
            (te / "config.json").write_text(json.dumps({"vocab": self.text_encoder.vocab, "dim": self.cfg.text_dim,
                                                         "max_tokens": self.text_encoder.max_tokens,
                                                         "out_tokens": self.text_encoder.out_tokens}))
            (tmp / "backbone.json").write_text(json.dumps({"kind": "toy", "backbone_id": self.backbone_id, **meta},
                                                          indent=2))
        return out


def new_toy_backbone(cfg: BackboneConfig, vocab: list[str], seed: int = 0) -> ToyBackbone:
    torch.manual_seed(seed)
    return ToyBackbone(cfg, build_transformer(cfg), ToyTextEncoder(vocab, cfg.text_dim, cfg.max_text_tokens,
                                                                    cfg.text_context_tokens))


def load_toy_backbone(cfg: BackboneConfig) -> ToyBackbone:
    path = Path(cfg.path)
    if not (path / "backbone.json").is_file():
        raise FileNotFoundError(f"no toy backbone at {path}: run `i2l pretrain-backbone --preset toy` first "
                                f"(or `make run`)")
    meta = json.loads((path / "backbone.json").read_text())
    for k in ("image_size", "patch", "dim", "heads", "double_layers", "single_layers", "text_dim", "max_text_tokens"):
        setattr(cfg, k, meta[k])  # the saved model decides its architecture
    cfg.text_context_tokens = meta.get("text_context_tokens", 0)  # absent: saved before it existed (= all)
    transformer = Flux2Transformer2DModel.from_pretrained(path / "transformer")
    try:
        octaves = octaves_of(transformer.config.in_channels - transformer.config.out_channels)
    except ValueError as e:
        raise ValueError(f"{path / 'transformer'}: {e}") from None
    cfg.position_channels, cfg.position_octaves = octaves is not None, octaves or 0
    te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
    te = ToyTextEncoder(te_cfg["vocab"], te_cfg["dim"], te_cfg["max_tokens"], te_cfg.get("out_tokens"))
    te.load_state_dict(load_file(str(path / "text_encoder" / "model.safetensors")))
    return ToyBackbone(cfg, transformer, te)
