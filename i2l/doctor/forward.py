"""`i2l doctor --load`: each component that passed its header checks is loaded as the jobs load it and runs one
tiny forward (a 2x2-latent velocity, one gray image through the encoder, one gray image scored); a failure is a
problem on that component. On a GPU when one is present."""

from __future__ import annotations

import copy

import torch

from i2l.config import Config
from i2l.doctor import Component

FIX = "its files passed the header checks but it does not load or run as configured: re-copy the checkpoint " \
      "or fix the preset's settings for it"


def _finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} is not finite (NaN/Inf): broken weights")


def _backbone(cfg: Config, device: str) -> str:
    from i2l.backbones import load_backbone

    bb = load_backbone(copy.deepcopy(cfg)).to(device)
    side = 4 * bb.vae_scale_factor if hasattr(bb, "vae_scale_factor") else cfg.backbone.image_size
    shape = bb.latent_shape(side)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g).to(device)  # (1, C, h, w)
    if getattr(bb, "text_encoder", None) is not None:
        cond = bb.encode_prompts(["a red cat"])
    else:
        from i2l.backbones.random_init import random_cond

        cond = random_cond(bb, ["a red cat"], generator=g)
    with torch.no_grad():
        v = bb.velocity(x, torch.full((1,), 0.5, device=device), cond)  # (1, C, h, w)
        _finite(v, "the transformer's velocity")
        if getattr(bb, "vae", None) is not None:
            _finite(bb.decode_latents(v), "the VAE's decoded image")
    return f"forward ok on {device}: velocity {tuple(v.shape)}"


def _encoder(cfg: Config, device: str) -> str:
    from i2l.model.encoder import load_encoder

    enc = load_encoder(copy.deepcopy(cfg.encoder)).to(device)
    s = enc.cfg.image_size
    tok = enc(torch.zeros(1, 3, s, s))  # (1, P, D): a gray image
    if tuple(tok.shape) != (1, enc.tokens_per_image, enc.dim):
        raise ValueError(f"tokens {tuple(tok.shape)}, expected (1, {enc.tokens_per_image}, {enc.dim})")
    _finite(tok, "the encoder's tokens")
    return f"forward ok on {device}: tokens {tuple(tok.shape)}"


def _scorer(cfg: Config, name: str) -> str:
    from PIL import Image

    from i2l.eval.metrics import ScoreBatch, build_scorers

    scorer = next(s for s in build_scorers(cfg) if s.name == name)
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    out = scorer.score(ScoreBatch([gray], ["a red cat"], ["in the style of flat colours"]))
    values = {k: v[0] for k, v in out.items() if v and v[0] is not None}
    if not all(torch.isfinite(torch.tensor(float(v))) for v in values.values()):
        raise ValueError(f"scores {values} are not finite")
    return "forward ok: " + ", ".join(f"{k} {v:.3g}" for k, v in values.items())


def run_forwards(cfg: Config, comps: list[Component]) -> None:
    """One tiny forward per component in `comps`; the outcome is a fact or a problem on it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for comp in comps:
        try:
            if comp.name == "backbone":
                fact = _backbone(cfg, device)
            elif comp.name == "encoder":
                fact = _encoder(cfg, device)
            else:
                fact = _scorer(cfg, comp.name.removeprefix("scorer."))
        except Exception as e:  # noqa: BLE001 — whatever a load or forward raises is this component's problem
            comp.problem(f"--load: {type(e).__name__}: {' '.join(str(e).split())[:400]}", FIX)
            continue
        comp.facts.append(fact)
