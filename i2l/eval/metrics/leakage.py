"""Semantic leakage: how much an output depicts its references' *contents* instead of its own prompt.

    leakage = mean over references r of CLIP(image, content prompt of r) - CLIP(image, own prompt)

with CLIP = 100 * cos. Lower is better: a negative value means the image matches its own prompt better than the
references' contents (no leakage); a value near or above 0 means the references' subjects leaked into it.
References whose content prompt equals the sample's own prompt are left out (they cannot tell the two apart);
a sample with no other reference prompt gets None.
"""

from __future__ import annotations

import torch


def semantic_leakage(image_emb: torch.Tensor, prompt_emb: torch.Tensor, ref_prompt_embs: torch.Tensor) -> float:
    """Leakage of one image: image_emb (D,), prompt_emb (D,), ref_prompt_embs (R, D), all unit vectors."""
    own = 100 * (image_emb @ prompt_emb)  # ()
    refs = 100 * (ref_prompt_embs @ image_emb)  # (R,)
    return float(refs.mean() - own)


def leakage_scores(image_embs: torch.Tensor, prompts: list[str], reference_prompts: list[list[str]],
                   text_emb: dict[str, torch.Tensor]) -> list[float | None]:
    """Leakage per sample: image_embs (B, D); `text_emb` maps every prompt string to its unit embedding (D,)."""
    out: list[float | None] = []
    for img, prompt, refs in zip(image_embs, prompts, reference_prompts):
        others = [t for t in refs if t != prompt]
        if not others:
            out.append(None)
            continue
        out.append(semantic_leakage(img, text_emb[prompt], torch.stack([text_emb[t] for t in others])))
    return out
