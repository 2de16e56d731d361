"""Optional preference scorers of Table 1 — Aesthetic, PickScore, ImageReward, HPSv2, HPSv3 — computed the way the
paper's authors compute them: the model classes and scoring formulas of `diffsynth.metrics`, loaded from local
folders in DiffSynth-Studio/ImageMetrics' layout (`<Metric>/model.safetensors` + its tokenizer / processor files).

DiffSynth's own `XMetric.from_pretrained` cannot be used: it downloads (`download_if_necessary`) and recognises a
file by an md5 of its keys *with shapes*, and its constructors hard-code the full sizes. So each loader here
builds DiffSynth's model class (or the transformers model it wraps) from the sizes the folder states — a
`config.json` beside the weights when present, else DiffSynth's published full-size config — applies DiffSynth's
own state-dict converter, loads strictly (as DiffSynth does), then repeats the steps of its `from_pretrained`
(tokenizer special tokens, head dtypes) and scores through DiffSynth's `Metric` classes. One code path serves the
real checkpoints and their replicas (i2l/replicas/scorers.py). A scorer without a configured folder is skipped
with its reason; a folder lacking a file, or holding weights that do not fit, is named in one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from i2l.config import ScorerConfig
from i2l.eval.metrics.clip import resolve_device

WEIGHTS = "model.safetensors"
# the published ImageReward constants (ImageReward's `mean` / `std`, DiffSynth's ImageRewardModel defaults): the raw
# MLP reward is standardised with them
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072


def _file_version(tag: str, path: str | os.PathLike) -> str:
    p = Path(path)
    w = p / WEIGHTS if p.is_dir() else p
    return f"{tag}:{p.name}:{w.stat().st_size if w.is_file() else 'missing'}"


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """`folder/model.safetensors` as a state dict; a damaged file is one clear error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): re-copy it from the published "
                         f"DiffSynth-Studio/ImageMetrics folder") from e


def load_strict(model: torch.nn.Module, state: dict, folder: Path, what: str) -> None:
    """load_state_dict(strict=True) as DiffSynth's loader does; a mismatch names the file and the first keys."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{folder / WEIGHTS} does not hold {what} weights of the sizes its folder's config "
                         f"states: {str(e)[:600]}") from e


class _Plugin:
    """A metric read from one configured folder: lazy loading, a batch size and a device."""

    name = ""
    metrics: tuple[str, ...] = ()
    files: tuple[str, ...] = (WEIGHTS,)  # what the folder must hold (beyond these, the loader's own checks)
    layout = ""  # the folder's expected contents, for skip reasons and the doctor

    def __init__(self, path: str, sc: ScorerConfig):
        self.path, self.sc = path, sc
        self.device = resolve_device(sc.device)
        self._metric = None

    @property
    def folder(self) -> Path:
        return Path(self.path)

    @property
    def version(self) -> str:
        return _file_version(self.name, self.path) if self.path else f"{self.name}:unconfigured"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def available(self) -> tuple[bool, str]:
        field = f"scorer.{self.name}_path"
        if not self.path:
            return False, f"no weights configured: set {field} to a local folder holding {self.layout}"
        p = self.folder
        if not p.exists():
            return False, f"{field} {p} does not exist"
        if not p.is_dir():
            return False, f"{field} {p} is a file: set it to the folder holding {self.layout}"
        missing = [f for f in self.files if not (p / f).is_file()]
        if missing:
            return False, f"{field} {p} lacks {', '.join(missing)} (expected: {self.layout})"
        return True, ""

    def metric(self):
        """The loaded diffsynth.metrics Metric (loaded once)."""
        if self._metric is None:
            ok, reason = self.available()
            if not ok:
                raise FileNotFoundError(reason)
            self._metric = self._load(self.folder).to(self.device).eval()
        return self._metric

    def _load(self, folder: Path):
        raise NotImplementedError

    def _chunks(self, n: int):
        for i in range(0, n, self.sc.batch_size):
            yield slice(i, min(i + self.sc.batch_size, n))

    def _pairs(self, batch) -> list[float]:
        """The metric's score of each (prompt, image) pair, a chunk at a time."""
        out: list[float] = []
        for s in self._chunks(len(batch.images)):
            out += [float(v) for v in self.metric().score(batch.prompts[s], [im.convert("RGB")
                                                                            for im in batch.images[s]])]
        return out

    def score(self, batch) -> dict[str, list[float]]:
        return {self.name: self._pairs(batch)}


def _config(folder: Path, cls):
    """The transformers config `cls` read from folder/config.json, or None when the folder has none."""
    return cls.from_pretrained(str(folder), local_files_only=True) if (folder / "config.json").is_file() else None


def _vit_h14_config():
    """DiffSynth's ImageMetricsCLIPModel config (CLIP ViT-H-14) for a folder without config.json, with one fix:
    DiffSynth sets hidden_act "quick_gelu", but ViT-H-14 (open_clip's ViT-H-14.json has no quick_gelu) and the
    PickScore_v1 / laion CLIP-ViT-H-14 config.json use exact "gelu"; quick_gelu would change every score."""
    from diffsynth.models.clip import ImageMetricsCLIPModel

    cfg = ImageMetricsCLIPModel.config("h14")
    cfg.text_config.hidden_act = cfg.vision_config.hidden_act = "gelu"
    return cfg


class AestheticScorer(_Plugin):
    """LAION aesthetic score (~1-10): DiffSynth's AestheticModel, the MLP on the L2-normalised projected CLIP
    ViT-L/14 image embedding."""

    name, metrics = "aesthetic", ("aesthetic",)
    files = (WEIGHTS, "preprocessor_config.json")
    layout = ("DiffSynth-Studio/ImageMetrics Aesthetic/: model.safetensors (AestheticModel keys), "
              "preprocessor_config.json (CLIPImageProcessor), optional config.json (CLIPVisionConfig)")

    def _load(self, folder: Path):
        from diffsynth.metrics import AestheticMetric
        from diffsynth.models.aesthetic import AestheticMLP, AestheticModel
        from diffsynth.utils.state_dict_converters.image_metrics import (
            ImageMetricsAestheticStateDictConverter,
        )
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        state = ImageMetricsAestheticStateDictConverter(load_weights(folder))
        if "layers.0.weight" not in state:
            raise ValueError(f"{folder / WEIGHTS} holds no aesthetic MLP (layers.0.weight): is it the Aesthetic file?")
        cfg = _config(folder, CLIPVisionConfig)
        if cfg is None:
            vision, projection = AestheticModel.default_vision_model()  # DiffSynth's OpenAI ViT-L/14
        else:
            vision = CLIPVisionModel(cfg)
            projection = torch.nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)
        model = AestheticModel(AestheticMLP(state["layers.0.weight"].shape[1]), vision, projection)
        load_strict(model, state, folder, "Aesthetic (CLIP vision + MLP)")
        model.processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        model.layers = model.layers.float()
        return AestheticMetric(model)

    def score(self, batch) -> dict[str, list[float]]:
        out: list[float] = []
        for s in self._chunks(len(batch.images)):
            out += [float(v) for v in self.metric().score([im.convert("RGB") for im in batch.images[s]])]
        return {"aesthetic": out}


_CLIP_LAYOUT = "model.safetensors, CLIP processor files (preprocessor_config.json, tokenizer files), config.json"


class PickScoreScorer(_Plugin):
    """PickScore: logit_scale * cos(image, prompt) of a CLIP ViT-H-14 (PickScore_v1), by DiffSynth's PickScoreModel."""

    name, metrics = "pickscore", ("pickscore",)
    files = (WEIGHTS, "preprocessor_config.json")
    layout = f"DiffSynth-Studio/ImageMetrics PickScore/: {_CLIP_LAYOUT} (CLIPConfig; DiffSynth's ViT-H-14 if absent)"

    def _load(self, folder: Path):
        from diffsynth.metrics import PickScoreMetric
        from diffsynth.models.pickscore import PickScoreModel
        from diffsynth.utils.state_dict_converters.image_metrics import ImageMetricsCLIPStateDictConverter
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        model = CLIPModel(_config(folder, CLIPConfig) or _vit_h14_config())
        load_strict(model, ImageMetricsCLIPStateDictConverter(load_weights(folder)), folder, "CLIP (PickScore)")
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        return PickScoreMetric(PickScoreModel(model=model, processor=processor, max_length=77))

    def _pairs(self, batch) -> list[float]:
        # DiffSynth's PickScoreModel scores every prompt against every image (text @ image.T): a sample's own
        # PickScore is the diagonal of that matrix
        out: list[float] = []
        for s in self._chunks(len(batch.images)):
            matrix = self.metric().score(list(batch.prompts[s]), [im.convert("RGB") for im in batch.images[s]])
            out += [float(matrix[i][i]) for i in range(len(matrix))]
        return out


class HPSv2Scorer(_Plugin):
    """HPSv2(.1): DiffSynth's HPSv2Model, logit_scale * cos(image, prompt) of its fine-tuned CLIP ViT-H-14 (the
    open_clip checkpoint converted by DiffSynth's converter). The authors scale by logit_scale (their model card
    reports ~30); the `hpsv2` package reports the bare cosine (~0.3)."""

    name, metrics = "hpsv2", ("hpsv2",)
    files = (WEIGHTS, "preprocessor_config.json")
    layout = (f"DiffSynth-Studio/ImageMetrics HPSv2/: {_CLIP_LAYOUT} (the CLIPConfig the open_clip weights convert "
              f"into; DiffSynth's ViT-H-14 if absent)")

    def _load(self, folder: Path):
        from diffsynth.metrics import HPSv2Metric
        from diffsynth.models.hpsv2 import HPSv2Model
        from diffsynth.utils.state_dict_converters.image_metrics import ImageMetricsOpenCLIPStateDictConverter
        from transformers import AutoProcessor, CLIPConfig, CLIPModel

        state = load_weights(folder)
        if "visual.proj" not in state:
            raise ValueError(f"{folder / WEIGHTS} is not an open_clip state dict (no visual.proj): HPSv2/ holds "
                             f"HPS_v2.1's open_clip weights")
        model = CLIPModel(_config(folder, CLIPConfig) or _vit_h14_config())
        load_strict(model, ImageMetricsOpenCLIPStateDictConverter(state), folder, "open_clip CLIP (HPSv2)")
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        return HPSv2Metric(HPSv2Model(model=model, processor=processor))


class ImageRewardScorer(_Plugin):
    """ImageReward: DiffSynth's ImageRewardModel — BLIP's text encoder cross-attending to its ViT's image tokens,
    the [CLS] feature through the MLP, standardised with the published mean / std."""

    name, metrics = "imagereward", ("imagereward",)
    files = (WEIGHTS, "med_config.json", "vocab.txt")
    layout = ("DiffSynth-Studio/ImageMetrics ImageReward/: model.safetensors (ImageReward.pt's keys), "
              "med_config.json (BLIP's BertConfig), BertTokenizer files (vocab.txt, tokenizer_config.json)")

    def _load(self, folder: Path):
        from diffsynth.metrics import ImageRewardMetric
        from diffsynth.models.image_reward import ImageRewardModel
        from diffsynth.utils.state_dict_converters.image_metrics import (
            ImageMetricsImageRewardStateDictConverter,
        )
        from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

        try:
            state = ImageMetricsImageRewardStateDictConverter(load_weights(folder))
        except KeyError as e:
            raise ValueError(f"{folder / WEIGHTS} holds no BLIP text encoder ({e}): is it the ImageReward file?") from e
        med = json.loads((folder / "med_config.json").read_text())
        model = ImageRewardModel(blip=BlipForImageTextRetrieval(BlipConfig(
            vision_config=_blip_vision_config(state, folder), projection_dim=_projection_dim(state),
            text_config={**{k: v for k, v in med.items() if k not in ("architectures", "model_type", "encoder_width")},
                         "encoder_hidden_size": med["encoder_width"], "add_cross_attention": True,
                         "is_decoder": True})), mean=IMAGE_REWARD_MEAN, std=IMAGE_REWARD_STD)
        load_strict(model, state, folder, "ImageReward (BLIP + MLP)")
        # as ImageRewardMetric.from_pretrained: BLIP's tokenizer with its [DEC] / [ENC] tokens, 35 tokens
        tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.convert_tokens_to_ids("[ENC]")
        vocab = model.blip.config.text_config.vocab_size
        if len(tok) != vocab:
            raise ValueError(f"{folder}/vocab.txt gives {len(tok)} tokens (with [DEC], [ENC]) but the text encoder "
                             f"has {vocab}: tokenizer and weights are from different releases")
        model.tokenizer, model.max_length = tok, 35
        model.mlp = model.mlp.float()
        return ImageRewardMetric(model)


def _blip_vision_config(state: dict, folder: Path) -> dict:
    """BLIP's ViT sizes from the converted weights' shapes (ImageReward ships no vision config: DiffSynth
    hard-codes ViT-L/16). Heads: BLIP's ViTs (timm ViT-B/L) use 64-wide heads."""
    pre = "blip.vision_model."
    try:
        width = state[pre + "embeddings.class_embedding"].shape[-1]
        patch = state[pre + "embeddings.patch_embedding.weight"].shape[-1]
        positions = state[pre + "embeddings.position_embedding"].shape[1]
        inner = state[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{folder / WEIGHTS} holds no BLIP vision tower ({e}): is it the ImageReward file?") from e
    layers = len({k.split(".")[4] for k in state if k.startswith(pre + "encoder.layers.")})
    side = round((positions - 1) ** 0.5) * patch
    return {"hidden_size": width, "intermediate_size": inner, "num_hidden_layers": layers,
            "num_attention_heads": max(1, width // 64), "image_size": side, "patch_size": patch,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6}


def _projection_dim(state: dict) -> int:
    w = state.get("blip.vision_proj.weight")
    return int(w.shape[0]) if w is not None else 256


class HPSv3Scorer(_Plugin):
    """HPSv3: DiffSynth's HPSv3Model on its Qwen2-VL reward model; the score is mu of the ranknet head's (mu, sigma)
    read at the <|Reward|> token of HPSv3's instruction prompt."""

    name, metrics = "hpsv3", ("hpsv3",)
    files = (WEIGHTS,)
    layout = ("DiffSynth-Studio/ImageMetrics HPSv3/: model.safetensors (Qwen2-VL + rm_head), Qwen2-VL processor files "
              "(preprocessor_config.json or processor_config.json, tokenizer files, chat template), optional "
              "config.json (Qwen2VLConfig; DiffSynth's Qwen2-VL-7B if absent)")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32  # DiffSynth's default: bfloat16

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if ok and not any((self.folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            return False, f"scorer.hpsv3_path {self.path} has no Qwen2-VL processor files (expected: {self.layout})"
        return ok, reason

    def _load(self, folder: Path):
        from diffsynth.metrics import HPSv3Metric
        from diffsynth.models.hpsv3 import HPSv3Model, HPSv3Qwen2VLRewardModel
        from diffsynth.utils.state_dict_converters.image_metrics import ImageMetricsHPSv3StateDictConverter
        from transformers import AutoProcessor, Qwen2VLConfig

        state = ImageMetricsHPSv3StateDictConverter(load_weights(folder))
        try:
            vocab = state["model.language_model.embed_tokens.weight"].shape[0]
            head, out_dim = state["rm_head.0.weight"].shape[0], state["rm_head.5.weight"].shape[0]
        except KeyError as e:
            raise ValueError(f"{folder / WEIGHTS} is not an HPSv3 reward model ({e} missing)") from e
        cfg = _config(folder, Qwen2VLConfig) or HPSv3Qwen2VLRewardModel.default_config(vocab)
        with torch.device(self.device):  # a 7B trunk is built where it will run, in its dtype
            default = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                model = HPSv3Qwen2VLRewardModel(config=cfg, vocab_size=vocab, output_dim=out_dim,
                                                reward_token="special", rm_head_type="ranknet",
                                                rm_head_kwargs={"hidden_size": head})
            finally:
                torch.set_default_dtype(default)
        load_strict(model, {k: v.to(self.dtype) if not k.startswith("rm_head.") else v.float()
                            for k, v in state.items()}, folder, "HPSv3 (Qwen2-VL + reward head)")
        # as HPSv3Metric.from_pretrained: right padding, the <|Reward|> token, pad ids, a float32 head
        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True, padding_side="right")
        processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
        if len(processor.tokenizer) != vocab:
            raise ValueError(f"{folder}'s tokenizer has {len(processor.tokenizer)} tokens with <|Reward|> but the "
                             f"model {vocab}: tokenizer and weights are from different releases")
        model.special_token_ids = processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
        model.reward_token = "special"
        model.config.tokenizer_padding_side = processor.tokenizer.padding_side
        model.config.pad_token_id = processor.tokenizer.pad_token_id
        if hasattr(model.config, "text_config"):
            model.config.text_config.pad_token_id = processor.tokenizer.pad_token_id
        model.rm_head.to(torch.float32)
        return HPSv3Metric(HPSv3Model(model=model, processor=processor, use_special_tokens=True,
                                      max_pixels=256 * 28 * 28, min_pixels=256 * 28 * 28, score_index=0))


PLUGINS = (AestheticScorer, PickScoreScorer, ImageRewardScorer, HPSv2Scorer, HPSv3Scorer)


def build_plugins(sc: ScorerConfig) -> list[_Plugin]:
    return [cls(getattr(sc, f"{cls.name}_path"), sc) for cls in PLUGINS]
