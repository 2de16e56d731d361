"""The i2L predictor (paper §3.1): learnable LoRA queries + image tokens -> single-stream transformer ->
per-layer compressed linear heads -> LoRA A/B for every adapted layer, in one forward pass.

Shapes: B batch, S = N·P image tokens, L adapted layers, k rank, Q = 2·k·L queries, H hidden, c compressed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from i2l.config import PredictorConfig
from i2l.model.compressed_decoding import CompressedHeads
from i2l.model.lora import LoRA

# Rows of the reference-index table: kept at 64 so that checkpoints keep their shape, but only the first
# `predictor.max_refs` (the most references training draws) are ever read: see I2LPredictor.ref_slots.
MAX_REFS = 64


class I2LPredictor(nn.Module):
    def __init__(self, cfg: PredictorConfig, targets: dict[str, tuple[int, int]], token_dim: int,
                 backbone_id: str = ""):
        super().__init__()
        self.cfg = cfg
        self.names = list(targets)
        self.targets = dict(targets)
        self.backbone_id = backbone_id
        L, k, H = len(self.names), cfg.rank, cfg.hidden
        self.in_proj = nn.Linear(token_dim, H)
        if not 1 <= cfg.max_refs <= MAX_REFS:
            raise ValueError(f"predictor.max_refs must be in [1, {MAX_REFS}], got {cfg.max_refs}")
        self.trained_refs = cfg.max_refs  # training draws 1..max_refs references: rows beyond never get a gradient
        if cfg.depth < 1:
            raise ValueError(f"predictor.depth must be >= 1 (its last block decodes the queries), got {cfg.depth}")
        self.ref_embed = nn.Embedding(MAX_REFS, H)  # which reference a token came from
        # small like the other learned embeddings: N copies of one reference then fuse to ~its own LoRA
        nn.init.normal_(self.ref_embed.weight, std=0.02)
        # a query = its own free vector + layer, type (A rows / B columns) and rank-slot embeddings
        self.query = nn.Parameter(torch.randn(L, 2, k, H) * 0.02)  # (L, 2, k, H)
        self.layer_embed = nn.Parameter(torch.randn(L, 1, 1, H) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(1, 2, 1, H) * 0.02)
        self.rank_embed = nn.Parameter(torch.randn(1, 1, k, H) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(H, cfg.heads, dim_feedforward=4 * H, dropout=0.0, batch_first=True,
                                       norm_first=True, activation="gelu") for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(H)
        self.head_A = CompressedHeads(H, cfg.compress, [targets[n][0] for n in self.names], zero=False)
        # B's expansion starts at zero so an untrained predictor's LoRA is exactly a no-op (ΔW = B·A = 0)
        self.head_B = CompressedHeads(H, cfg.compress, [targets[n][1] for n in self.names], zero=True)
        self.log_alpha = nn.Parameter(torch.full((L,), math.log(cfg.alpha)))  # α per layer, learned
        self.register_buffer("a_scale", torch.tensor([targets[n][0] ** -0.5 for n in self.names]))

    def ref_slots(self, ref_index: torch.Tensor) -> torch.Tensor:
        """Reference index -> the row of ref_embed that tags its tokens: reference i takes row i mod max_refs.

        The paper concatenates the references' tokens as an unordered set (§3.1, Eq. 1) and trains on 1..max_refs
        of them (§3.3); the rows only tell the references apart, and training draws them in random order, so the
        rows are interchangeable tags of which the model has seen up to max_refs at once. Up to max_refs
        references this is the identity (what training saw, bit for bit); beyond it the references reuse the
        trained rows in turn, evenly (8 references on max_refs 4 = two tagged sets of 4), so no row that never
        received a gradient is ever read."""
        return ref_index % self.trained_refs

    @property
    def num_queries(self) -> int:
        return self.query.shape[0] * 2 * self.query.shape[2]

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, ref_index: torch.Tensor) -> LoRA:
        """tokens (B, S, D), keep (B, S) bool, ref_index (B, S) -> batched LoRA (A (B, k, in), B (B, out, k))."""
        Bsz = tokens.shape[0]
        L, _, k, H = self.query.shape
        z = self.in_proj(tokens) + self.ref_embed(self.ref_slots(ref_index))  # (B, S, H)
        q = (self.query + self.layer_embed + self.type_embed + self.rank_embed).reshape(1, -1, H)  # (1, Q, H)
        x = torch.cat([q.expand(Bsz, -1, -1), z], dim=1)  # (B, Q+S, H)
        # Additive key bias: -inf drops padding; -log N on image tokens gives N fused references together the
        # attention mass of one, so fusing copies of one reference reproduces its LoRA and the queries'
        # share of attention does not shrink as N grows (token concatenation of Eq. 1 is unchanged).
        n = (ref_index.masked_fill(~keep, -1).amax(1) + 1).clamp(min=1).to(z.dtype)  # (B,) references
        img_bias = (-n.log())[:, None].expand_as(keep).masked_fill(~keep, float("-inf"))  # (B, S)
        bias = torch.cat([z.new_zeros(Bsz, q.shape[1]), img_bias], dim=1)  # (B, Q+S)
        fast = torch.backends.mha.get_fastpath_enabled()
        # PyTorch's fused inference kernel reads a float key mask as a boolean one (any non-zero = masked)
        torch.backends.mha.set_fastpath_enabled(fast and bool((n == 1).all()))
        try:
            for blk in self.blocks[:-1]:
                x = blk(x, src_key_padding_mask=bias)  # (B, Q+S, H)
            x = query_rows(self.blocks[-1], x, bias, q.shape[1])  # (B, Q, H)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        h = self.norm(x).reshape(Bsz, L, 2, k, H)
        rows_A = self.head_A(h[:, :, 0], self.a_scale)  # L x (B, k, d_in)
        cols_B = self.head_B(h[:, :, 1], self.log_alpha.exp())  # L x (B, k, d_out)
        A = dict(zip(self.names, rows_A))  # (B, k, in)
        Bm = {n: c.transpose(1, 2) for n, c in zip(self.names, cols_B)}  # (B, out, k)
        return LoRA(A, Bm, self.backbone_id)


def query_rows(blk: nn.TransformerEncoderLayer, x: torch.Tensor, bias: torch.Tensor, n_q: int) -> torch.Tensor:
    """The last block on the query rows alone: x (B, Q+S, H) -> (B, Q, H), equal to blk(x)[:, :Q] (pre-norm).

    Only query states are decoded, so the image tokens' own outputs of the last block were computed to be thrown
    away: they attend as keys and values, never as queries. At 4 references (Q = 128, S = 64 on the toy world) the
    block does a third less work: the toy predictor (one block) ran 1.26-1.56x faster side by side (docs/results.md)."""
    h = blk.norm1(x)
    att = blk.self_attn(h[:, :n_q], h, h, key_padding_mask=bias, need_weights=False)[0]  # (B, Q, H)
    x = x[:, :n_q] + blk.dropout1(att)
    return x + blk.dropout2(blk.linear2(blk.dropout(blk.activation(blk.linear1(blk.norm2(x))))))


def predict_lora(predictor: I2LPredictor, encoder, refs: torch.Tensor, n_refs: torch.Tensor | None = None) -> LoRA:
    """refs (B, N, 3, H, W) in [-1, 1] (padded), n_refs (B,) -> a batched LoRA, one per sample."""
    if refs.dim() == 4:
        refs = refs.unsqueeze(0)  # one sample of N references
    if n_refs is None:
        n_refs = torch.full((refs.shape[0],), refs.shape[1], dtype=torch.long)
    if refs.shape[1] == 0 or int(n_refs.min()) < 1:
        raise ValueError("i2L needs at least one reference image per LoRA")
    return lora_from_tokens(predictor, *encoder.encode_refs(refs, n_refs))


def lora_from_tokens(predictor: I2LPredictor, tokens: torch.Tensor, keep: torch.Tensor,
                     ref_index: torch.Tensor) -> LoRA:
    """The predictor on encoded references (`ImageEncoder.encode_refs` / `encode_ref_sets`) -> a batched LoRA."""
    p = next(predictor.parameters())
    return predictor(tokens.to(p.dtype), keep, ref_index)
