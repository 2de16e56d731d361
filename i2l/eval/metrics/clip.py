"""CLIP scores through open_clip: CLIP-Text (vs the content prompt), CLIP-Style (vs the style description),
image<->references style similarity and semantic leakage. One code path for the toy scorer and ViT-H-14.
CLIP score = 100 * cos(image, text); texts are truncated at the model's context length."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from i2l.config import ScorerConfig
from i2l.eval.metrics.leakage import leakage_scores
from i2l.layout import SCORER_FILE

# Weight files we agree to open: safetensors, or torch pickles read with weights_only=True.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# A scorer directory (as `i2l pretrain-scorer` writes one): scorer.json (SCORER_FILE) naming the open_clip model,
# that model's config <model>.json, and its weights.
WEIGHTS_FILE = "model.safetensors"


def register_model_config(config_path: str | os.PathLike) -> str:
    """Register one open_clip model config JSON (file stem = model name) and return the name."""
    import open_clip

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} not found")
    open_clip.add_model_config(path)
    if path.stem not in open_clip.list_models():
        raise ValueError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
    return path.stem


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` => the GPU when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ClipModel:
    """An open_clip model with its tokenizer and eval preprocessing; embeddings come out L2-normalised."""

    def __init__(self, model, tokenizer, preprocess, device: torch.device, name: str, version: str):
        self.model, self.tokenizer, self.preprocess = model.eval().to(device), tokenizer, preprocess
        self.device, self.name, self.version = device, name, version

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """(B, D) unit image embeddings, on the CPU."""
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])  # (b,3,H,W)
            out.append(self.model.encode_image(x.to(self.device), normalize=True).float().cpu())  # (b, D)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """(B, D) unit text embeddings, on the CPU."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)  # (b, context_length)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())  # (b, D)
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)


def clip_version(path: str | os.PathLike, model_name: str = "") -> str:
    """A short identity of the scorer weights, recorded next to every score (cheap: no hashing of big files)."""
    p = Path(path)
    if p.is_dir() and (p / SCORER_FILE).is_file():
        info = json.loads((p / SCORER_FILE).read_text())
        return f"{info['model']}-v{info['version']}-{info['data_hash'][:10]}-s{info['steps']}"
    if p.is_file():
        return f"{model_name}:{p.name}:{p.stat().st_size}"
    return f"{model_name}:{p.name}"


def load_clip_scorer(path: str | os.PathLike, model_name: str | None = None, device: str = "auto") -> ClipModel:
    """Load an open_clip scorer from a local path, never downloading anything.

    `path` is one of: a toy scorer dir written by `i2l pretrain-scorer` (scorer.json + model config +
    model.safetensors; `model_name` may be omitted); an open_clip checkpoint file such as ViT-H-14's
    (`model_name` names its architecture, e.g. "ViT-H-14"); or a dir with `open_clip_config.json` + weights.
    Pickled checkpoints are read with weights_only=True.
    """
    import open_clip

    p = Path(path)
    dev = resolve_device(device)
    if not p.exists():
        raise FileNotFoundError(f"CLIP scorer {p} not found: run `i2l pretrain-scorer` for the toy scorer, "
                                f"or set scorer.clip_checkpoint to a local open_clip checkpoint")
    if p.is_dir() and (p / SCORER_FILE).is_file():
        info = json.loads((p / SCORER_FILE).read_text())
        name = info["model"]
        if model_name and model_name != name:
            raise ValueError(f"{p} holds a {name!r} scorer, not {model_name!r}; set scorer.clip_model={name}")
        register_model_config(p / f"{name}.json")
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(p / WEIGHTS_FILE), device=dev, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    elif p.is_dir() and (p / "open_clip_config.json").is_file():
        name = f"local-dir:{p}"
        if not any(p.glob("*.safetensors")):
            raise ValueError(f"{p} has no .safetensors weights; only safetensors are loaded from a model dir")
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=dev, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    elif p.is_file():
        if not model_name:
            raise ValueError(f"checkpoint file {p} needs its architecture: set scorer.clip_model (e.g. ViT-H-14)")
        if p.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{p}: unsupported weight file type {p.suffix!r}; use one of {WEIGHT_SUFFIXES}")
        if model_name.endswith(".json"):  # an open_clip model config file: register it under its stem
            model_name = register_model_config(model_name)
        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; register its config JSON first")
        name = model_name
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(p), device=dev, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        raise FileNotFoundError(f"{p} is neither a toy scorer dir (scorer.json), an open_clip model dir "
                                f"(open_clip_config.json) nor a checkpoint file")
    return ClipModel(model, tokenizer, preprocess, dev, name, clip_version(p, name))


def default_clip_path(sc: ScorerConfig, toy_scorer_dir: str | os.PathLike) -> Path:
    """Where the CLIP scorer is read from: scorer.clip_checkpoint, else the toy scorer's dir (given by the caller:
    i2l.eval.metrics.default_scorer_dir, <data_root>/toy/<preset>/scorer, where `i2l pretrain-scorer` writes it)."""
    return Path(sc.clip_checkpoint) if sc.clip_checkpoint else Path(toy_scorer_dir)


class ClipScorer:
    """clip_text, clip_style, ref_style_sim and leakage from one open_clip model (loaded on first use)."""

    name = "clip"
    metrics = ("clip_text", "clip_style", "ref_style_sim", "leakage")

    def __init__(self, sc: ScorerConfig, toy_scorer_dir: str | os.PathLike):
        self.path = default_clip_path(sc, toy_scorer_dir)
        self.model_name = sc.clip_model
        self.device, self.batch_size = sc.device, sc.batch_size
        self._clip: ClipModel | None = None

    @property
    def version(self) -> str:
        return clip_version(self.path, self.model_name)

    def available(self) -> tuple[bool, str]:
        p = self.path
        if not p.exists():
            if not p.suffix:  # a scorer directory, as the toy presets use
                return False, f"CLIP scorer directory {p} not found: run `i2l pretrain-scorer` first"
            return False, (f"no {self.model_name} checkpoint at {p}: set scorer.clip_checkpoint "
                           f"(I2L_CLIP_CKPT for klein4b/zimage) to a local open_clip checkpoint file")
        if p.is_dir() and (p / SCORER_FILE).is_file():
            model = json.loads((p / SCORER_FILE).read_text()).get("model")
            if model != self.model_name:
                return False, (f"{p} holds a {model} scorer but scorer.clip_model is {self.model_name}: "
                               f"set scorer.clip_checkpoint to a {self.model_name} checkpoint")
        elif p.is_dir() and not (p / "open_clip_config.json").is_file():
            return False, f"{p} holds no scorer.json: re-run `i2l pretrain-scorer --out {p}`"
        return True, ""

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:
            self._clip = load_clip_scorer(self.path, self.model_name, self.device)
        return self._clip

    def score(self, batch) -> dict[str, list[float | None]]:
        clip = self.clip
        img = clip.encode_images(batch.images, self.batch_size)  # (B, D)
        texts = sorted(set(batch.prompts) | set(batch.styles) | {t for ts in batch.reference_prompts for t in ts})
        emb = dict(zip(texts, clip.encode_texts(texts)))  # text -> (D,)
        prompt = torch.stack([emb[t] for t in batch.prompts])  # (B, D)
        style = torch.stack([emb[t] for t in batch.styles])  # (B, D)
        out: dict[str, list[float | None]] = {
            "clip_text": (100 * (img * prompt).sum(-1)).tolist(),
            "clip_style": (100 * (img * style).sum(-1)).tolist(),
            "ref_style_sim": [None] * len(batch.images),
            "leakage": [None] * len(batch.images),
        }
        if batch.references:
            flat = [r for refs in batch.references for r in refs]
            ref = clip.encode_images(flat, self.batch_size) if flat else torch.empty(0, img.shape[1])  # (ΣN, D)
            start = 0
            for i, refs in enumerate(batch.references):
                if refs:
                    mean = ref[start:start + len(refs)].mean(0)  # (D,)
                    out["ref_style_sim"][i] = float(100 * torch.nn.functional.cosine_similarity(img[i], mean, 0))
                start += len(refs)
        if batch.reference_prompts:
            out["leakage"] = leakage_scores(img, batch.prompts, batch.reference_prompts, emb)
        return out
