"""Optional preference scorers, each enabled only by a local weight path: LAION aesthetic, PickScore,
ImageReward, HPSv2, HPSv3. Unconfigured or uninstalled ones report why via `available()`; they never guess."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from i2l.config import ScorerConfig
from i2l.eval.metrics.clip import WEIGHT_SUFFIXES, load_clip_scorer, resolve_device


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch pickle read with weights_only=True."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if p.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{p}: unsupported weight file type {p.suffix!r}; use one of {WEIGHT_SUFFIXES}")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _file_version(tag: str, path: str | os.PathLike) -> str:
    p = Path(path)
    return f"{tag}:{p.name}:{p.stat().st_size if p.is_file() else 'dir'}" if p.exists() else f"{tag}:{p.name}"


class _Plugin:
    """Common parts: a configured path, lazy loading, a batch size and a device."""

    name = ""
    metrics: tuple[str, ...] = ()
    package: str | None = None  # import name of a package the scorer needs; checked by available()
    pip_name: str | None = None  # its name on PyPI, for the skip reason

    def __init__(self, path: str, sc: ScorerConfig):
        self.path, self.sc = path, sc
        self.device = resolve_device(sc.device)
        self._model = None

    @property
    def version(self) -> str:
        return _file_version(self.name, self.path) if self.path else f"{self.name}:unconfigured"

    def available(self) -> tuple[bool, str]:
        if self.package and importlib.util.find_spec(self.package) is None:
            return False, f"package {self.pip_name or self.package} not installed"
        if not self.path:
            return False, f"no weights configured: set scorer.{self.name}_path to a local checkpoint"
        if not Path(self.path).exists():
            return False, f"scorer.{self.name}_path {self.path} does not exist"
        return True, ""

    def _chunks(self, n: int):
        for i in range(0, n, self.sc.batch_size):
            yield slice(i, min(i + self.sc.batch_size, n))


class AestheticMLP(nn.Module):
    """LAION improved-aesthetic-predictor head: linear layers (no activations, as released) on a unit CLIP
    ViT-L/14 image embedding; parameter names match the released state dict (`layers.{0,2,4,6,7}`)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)  # (B, D) -> (B,)


class AestheticScorer(_Plugin):
    """LAION aesthetic score (~1-10) from the MLP on the normalised CLIP image embedding."""

    name, metrics = "aesthetic", ("aesthetic",)

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if ok and not self.sc.aesthetic_clip_checkpoint:
            return False, ("the aesthetic MLP reads CLIP ViT-L/14 embeddings: set scorer.aesthetic_clip_checkpoint "
                           "to a local open_clip checkpoint of it")
        if ok and not Path(self.sc.aesthetic_clip_checkpoint).exists():
            return False, f"scorer.aesthetic_clip_checkpoint {self.sc.aesthetic_clip_checkpoint} does not exist"
        return ok, reason

    def _load(self):
        if self._model is None:
            sd = {k.removeprefix("module."): v for k, v in load_state_dict_file(self.path).items()}
            if "layers.0.weight" not in sd:
                raise ValueError(f"{self.path} is not a LAION aesthetic MLP (no layers.0.weight)")
            mlp = AestheticMLP(sd["layers.0.weight"].shape[1])
            mlp.load_state_dict(sd)
            clip = load_clip_scorer(self.sc.aesthetic_clip_checkpoint, self.sc.aesthetic_clip_model, self.sc.device)
            if clip.embed_dim != sd["layers.0.weight"].shape[1]:
                raise ValueError(f"aesthetic MLP expects {sd['layers.0.weight'].shape[1]}-d embeddings but "
                                 f"{self.sc.aesthetic_clip_model} gives {clip.embed_dim}-d: use CLIP ViT-L/14")
            self._model = (mlp.eval().to(self.device), clip)
        return self._model

    @torch.no_grad()
    def score(self, batch) -> dict[str, list[float]]:
        mlp, clip = self._load()
        emb = clip.encode_images(batch.images, self.sc.batch_size)  # (B, D), unit norm as LAION's inference
        return {"aesthetic": mlp(emb.to(self.device)).float().cpu().tolist()}


class PickScoreScorer(_Plugin):
    """PickScore: logit_scale * cos(image, prompt) with a transformers CLIPModel (PickScore_v1) from a local dir."""

    name, metrics = "pickscore", ("pickscore",)

    @property
    def processor_path(self) -> str:
        return self.sc.pickscore_processor_path or self.path

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        proc = Path(self.processor_path)
        if ok and not any((proc / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            return False, (f"no CLIP processor in {self.processor_path}: set scorer.pickscore_processor_path to a "
                           f"local CLIP-ViT-H-14 processor dir (preprocessor_config.json + tokenizer files)")
        return ok, reason

    def _load(self):
        if self._model is None:
            from transformers import CLIPModel, CLIPProcessor

            model = CLIPModel.from_pretrained(self.path, local_files_only=True, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(self.processor_path, local_files_only=True)
            self._model = (model.eval().to(self.device), processor)
        return self._model

    @torch.no_grad()
    def score(self, batch) -> dict[str, list[float]]:
        model, processor = self._load()
        out: list[float] = []
        for s in self._chunks(len(batch.images)):
            imgs = processor(images=[im.convert("RGB") for im in batch.images[s]], return_tensors="pt")
            txt = processor(text=batch.prompts[s], padding=True, truncation=True, max_length=77,
                            return_tensors="pt")
            ie = _features(model.get_image_features(pixel_values=imgs["pixel_values"].to(self.device)))  # (b, D)
            te = _features(model.get_text_features(input_ids=txt["input_ids"].to(self.device),
                                                   attention_mask=txt["attention_mask"].to(self.device)))  # (b, D)
            ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
            out += (model.logit_scale.exp() * (ie * te).sum(-1)).float().cpu().tolist()
        return {"pickscore": out}


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


class ImageRewardScorer(_Plugin):
    """ImageReward through the `image-reward` package; ImageReward.pt with med_config.json beside it."""

    name, metrics, package, pip_name = "imagereward", ("imagereward",), "ImageReward", "image-reward"

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if ok and not (Path(self.path).parent / "med_config.json").is_file():
            return False, f"med_config.json not found beside {self.path} (ImageReward needs it; nothing is downloaded)"
        return ok, reason

    @torch.no_grad()
    def score(self, batch) -> dict[str, list[float]]:
        if self._model is None:
            import ImageReward as RM

            self._model = RM.load(str(self.path), device=str(self.device),
                                  med_config=str(Path(self.path).parent / "med_config.json"))
        return {"imagereward": [float(self._model.score(p, im.convert("RGB")))
                                for p, im in zip(batch.prompts, batch.images)]}


class HPSv2Scorer(_Plugin):
    """HPSv2(.1): cos(image, prompt) of its fine-tuned open_clip ViT-H-14, as `hpsv2.score` reports it (~0.2-0.35).
    The checkpoint is loaded by our open_clip code (weights_only), so the `hpsv2` package (and its hub download)
    is not needed: open_clip is."""

    name, metrics, package, pip_name = "hpsv2", ("hpsv2",), "open_clip", "open_clip_torch"

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if ok and (not Path(self.path).is_file() or Path(self.path).suffix not in WEIGHT_SUFFIXES):
            return False, (f"scorer.hpsv2_path {self.path} is not a checkpoint file ({', '.join(WEIGHT_SUFFIXES)}):"
                           f" set it to the HPSv2(.1) open_clip ViT-H-14 file, e.g. HPS_v2.1_compressed.pt")
        return ok, reason

    @torch.no_grad()
    def score(self, batch) -> dict[str, list[float]]:
        if self._model is None:
            self._model = load_clip_scorer(self.path, self.sc.hpsv2_clip_model, self.sc.device)
        img = self._model.encode_images(batch.images, self.sc.batch_size)  # (B, D)
        txt = self._model.encode_texts(batch.prompts)  # (B, D)
        return {"hpsv2": (img * txt).sum(-1).tolist()}


class HPSv3Scorer(_Plugin):
    """HPSv3 through the `hpsv3` package (Qwen2-VL based; it pins old transformers, so it is usually absent)."""

    name, metrics, package, pip_name = "hpsv3", ("hpsv3",), "hpsv3", "hpsv3"

    @torch.no_grad()
    def score(self, batch) -> dict[str, list[float]]:
        if self._model is None:
            from hpsv3 import HPSv3RewardInferencer

            self._model = HPSv3RewardInferencer(checkpoint_path=str(self.path), device=str(self.device))
        out: list[float] = []
        for s in self._chunks(len(batch.images)):
            rewards = self._model.reward(prompts=batch.prompts[s], image_paths=list(batch.images[s]))
            out += [float(r[0]) for r in rewards]  # each reward is (mu, sigma): the score is mu
        return {"hpsv3": out}


def build_plugins(sc: ScorerConfig) -> list[_Plugin]:
    return [AestheticScorer(sc.aesthetic_path, sc), PickScoreScorer(sc.pickscore_path, sc),
            ImageRewardScorer(sc.imagereward_path, sc), HPSv2Scorer(sc.hpsv2_path, sc),
            HPSv3Scorer(sc.hpsv3_path, sc)]
