"""Out-of-family styles: does i2L move samples toward styles unlike any it was trained on?

Foreign styles (i2l/toy/foreign.py: other textures, palettes and figure treatments than the toy world's) are
written in the MegaStyle layout next to the evaluation's outputs and read back with the data code; they are never
in a training set. For each style, i2L predicts a LoRA from its first `n_refs` images; every style is then drawn
with the SAME prompts and seeds, by the base model and with its i2L LoRA: with symmetric CFG (the LoRA on both
branches, as the i2l_<n>ref method) and with asymmetric CFG (the gray-image LoRA on the negative branch, paper §3.4,
as i2l_<n>ref_asym).

The number, in the scorer's image-embedding space (the toy CLIP for toy presets; unit embeddings):
    margin(x, s) = cos(x, c_s) - mean_{s' != s} cos(x, c_s'),   c_s = the mean embedding of style s's references,
averaged over styles and prompts, for each method. The base model draws the same image for every style (same
prompt and seed, no LoRA), so its margin averages to exactly 0 over the styles, and so does that of any LoRA that
changes nothing; i2L's mean margin > 0 says its samples moved toward their own references rather than toward
other styles'. Reported: each method's mean margin and, for each i2L method, its margin minus the base's and the
share of styles where its margin beats the base's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from i2l.config import Config
from i2l.data.images import gray_image, to_pil
from i2l.data.shards import load_split
from i2l.model.lora import LoRA

# The generator is toy code, a layer above evaluation: named here and imported on use (as random_init names the
# toy encoder), so that the evaluation of a real preset never needs it unless it asks for foreign styles.
FOREIGN_WORLD = "i2l.toy.foreign:write_foreign_world"


@dataclass
class ForeignStyle:
    style_id: str
    description: str
    refs: list[Image.Image]
    ref_paths: list[str]


def foreign_styles(n: int, out_dir: Path, size: int, n_refs: int, seed: int = 0) -> tuple[list[ForeignStyle],
                                                                                          list[str]]:
    """Write `n` foreign styles under out_dir/world (MegaStyle layout), read them back with the data code, save
    each style's first n_refs images as its references. -> (styles, the shared prompts: the other contents of
    the first style, which every style is drawn with)."""
    from i2l.backbones.registry import resolve

    world = out_dir / "world"
    resolve(FOREIGN_WORLD)(n, world, size=size, seed=seed)
    rows = load_split(world, "train", columns=("id", "image", "content", "style"))
    by_style: dict[str, list[int]] = {}
    for i, sid in enumerate(rows["style_id"]):
        by_style.setdefault(sid, []).append(i)
    styles = []
    for sid, idx in by_style.items():
        refs = [rows["images"][i] for i in idx[:n_refs]]
        paths = []
        for j, im in enumerate(refs):
            p = out_dir / "refs" / f"{sid}_{j}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            im.save(p)
            paths.append(p)
        styles.append(ForeignStyle(sid, rows["style"][idx[0]], refs, paths))
    first = next(iter(by_style.values()))
    prompts = [rows["content"][i] for i in first[n_refs:]]
    return styles, prompts


def style_margins(image_emb: torch.Tensor, owner: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """image_emb (B, D) unit, owner (B,) style index, centroids (S, D) -> margin (B,): cos to the own style's
    centroid minus the mean cos to the other styles' centroids."""
    cos = image_emb @ torch.nn.functional.normalize(centroids, dim=-1).T  # (B, S)
    own = cos.gather(1, owner[:, None])[:, 0]
    others = (cos.sum(1) - own) / (cos.shape[1] - 1)
    return own - others


@torch.no_grad()
def _draw(model, cfg: Config, prompts: list[str], loras: list[LoRA], neg_loras: list[LoRA],
          seeds: list[int]) -> list[Image.Image]:
    from i2l.infer.guidance import sample, stack_rows

    bb = model.backbone
    shape = bb.latent_shape(cfg.backbone.image_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = sample(bb, bb.encode_prompts(prompts), bb.encode_prompts([""] * len(prompts)),
               LoRA.stack(loras).to(bb.device), stack_rows(neg_loras).to(bb.device),
               cfg.eval.guidance, cfg.eval.sample_steps, noise=noise.to(bb.device))
    return to_pil(bb.decode_latents(x))


def evaluate_out_of_family(model, cfg: Config, run_id: str, out_dir: str | Path, root: Path, clip=None,
                           predict: Callable[[list[Image.Image]], LoRA] | None = None, n_refs: int = 4) -> dict:
    """Draw and score cfg.eval.foreign_styles foreign styles (base vs i2L with n_refs references) into
    out_dir; -> {rows (for Store.record_out_of_family), summary} or {skipped: reason}.

    clip: the scorer's ClipModel (default: cfg.scorer's CLIP); predict: references -> LoRA (default: the
    model's i2L; a test passes a zero LoRA). Image paths are stored relative to `root` (the store's dir)."""
    n = cfg.eval.foreign_styles
    if n < 2:
        return {"skipped": "eval.foreign_styles < 2: a margin needs other styles to compare with"}
    if clip is None:
        from i2l.eval.metrics import default_scorer_dir
        from i2l.eval.metrics.clip import ClipScorer

        scorer = ClipScorer(cfg.scorer, default_scorer_dir(cfg))
        ok, reason = scorer.available()
        if not ok:
            return {"skipped": reason}
        clip = scorer.clip
    out = Path(out_dir)
    size = min(cfg.backbone.image_size, 256)
    styles, prompts = foreign_styles(n, out, size, n_refs, seed=cfg.eval.seed)
    prompts = prompts[: max(1, cfg.eval.foreign_prompts)]
    # the negative branch of asymmetric CFG: the LoRA predicted from gray images (a test's `predict` makes its own)
    gray = model.gray_lora(n_refs) if predict is None else predict([gray_image(cfg.encoder.image_size)])
    predict = predict or model.predict_lora
    targets = model.backbone.lora_targets()
    zero = LoRA({k: torch.zeros(1, v[0]) for k, v in targets.items()},
                {k: torch.zeros(v[1], 1) for k, v in targets.items()}, model.backbone.backbone_id)
    loras = [predict(s.refs) for s in styles]
    # method -> per style (positive LoRA, negative LoRA)
    methods = {"base": [(zero, zero)] * len(styles), f"i2l_{n_refs}ref": [(lo, lo) for lo in loras],
               f"i2l_{n_refs}ref_asym": [(lo, gray) for lo in loras]}
    jobs = [(m, si, pi) for m in methods for si in range(len(styles)) for pi in range(len(prompts))]
    seeds = [cfg.eval.seed + pi for _, _, pi in jobs]  # the same seed per prompt for every style and method
    images: list[Image.Image] = []
    step = max(1, cfg.eval.gen_batch)
    for k in range(0, len(jobs), step):
        chunk = jobs[k:k + step]
        pairs = [methods[m][si] for m, si, _ in chunk]
        images += _draw(model, cfg, [prompts[pi] for _, _, pi in chunk], [pos for pos, _ in pairs],
                        [neg for _, neg in pairs], seeds[k:k + step])
    centroids = torch.stack([clip.encode_images(s.refs).mean(0) for s in styles])  # (S, D)
    emb = clip.encode_images(images)  # (J, D)
    margins = style_margins(emb, torch.tensor([si for _, si, _ in jobs]), centroids).tolist()
    rows = []
    for (m, si, pi), im, seed, margin in zip(jobs, images, seeds, margins, strict=True):
        s = styles[si]
        path = out / "samples" / m / f"{s.style_id}_{pi}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        rows.append({"sample_id": f"{run_id}/out_of_family/{m}/{s.style_id}/{pi}", "run_id": run_id,
                     "style_id": s.style_id, "description": s.description, "method": m, "prompt": prompts[pi],
                     "seed": seed, "image_path": _relative(path, root),
                     "ref_paths": [_relative(p, root) for p in s.ref_paths], "margin": margin,
                     "scorer": getattr(clip, "name", "clip")})
    return {"rows": rows, "summary": margin_summary(rows)}


def margin_summary(rows: list[dict]) -> dict:
    """Per method the mean margin over styles and prompts; per i2L method (`vs_base`) its mean minus the base's
    and the share of styles where its mean margin is above the base's. i2l_method / i2l_minus_base /
    i2l_beats_base: those of the plain (symmetric CFG) i2L method, the first by name."""
    by: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        by.setdefault(r["method"], {}).setdefault(r["style_id"], []).append(r["margin"])
    per_style = {m: {s: sum(v) / len(v) for s, v in d.items()} for m, d in by.items()}
    means = {m: sum(d.values()) / len(d) for m, d in per_style.items()}
    out = {"styles": len(per_style.get("base", {})), "mean_margin": means}
    i2l = sorted(m for m in per_style if m != "base")  # i2l_4ref before i2l_4ref_asym: rows come in any order
    if "base" in per_style and i2l:
        base = per_style["base"]
        out["vs_base"] = {m: {"minus_base": means[m] - means["base"],
                              "beats_base": sum(per_style[m][s] > base[s] for s in base) / len(base)} for m in i2l}
        out["i2l_method"] = i2l[0]
        out["i2l_minus_base"] = out["vs_base"][i2l[0]]["minus_base"]
        out["i2l_beats_base"] = out["vs_base"][i2l[0]]["beats_base"]
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def record_out_of_family(model, cfg: Config, run_id: str, out_dir: Path, store, progress: bool = False) -> dict:
    """The evaluation stage's call: evaluate the foreign styles and record their rows in `store` (table
    out_of_family). -> the summary, or {skipped: reason} (then nothing is recorded)."""
    got = evaluate_out_of_family(model, cfg, run_id, out_dir, store.path.parent)
    if "rows" not in got:
        if progress:
            print(f"out-of-family styles skipped: {got['skipped']}")
        return got
    store.record_out_of_family(got["rows"])
    s = got["summary"]
    if progress:
        for m, v in s.get("vs_base", {}).items():
            print(f"out-of-family styles ({s['styles']}): style margin {m} - base = {v['minus_base']:+.4f}, "
                  f"above base on {100 * v['beats_base']:.0f}% of styles")
    return s
