"""Replicas of the scorers' checkpoints: open_clip ViT-H-14 laion2b_s32b_b79k (the CLIP scorer; also the CLIP
processor PickScore uses), PickScore_v1, the LAION aesthetic MLP with its OpenAI CLIP ViT-L/14, and HPSv2.1.
open_clip weights are written as safetensors only (open_clip_model.safetensors; the hub also publishes
open_clip_pytorch_model.bin, a pickle). The aesthetic MLP and HPSv2.1 are published only as torch pickles of
plain tensors: their replicas are such pickles too (torch.load(weights_only=True) reads them).
DiffSynth-Studio/ImageMetrics (`diffsynth_image_metrics`): the paper authors' converted single-folder layout of
Aesthetic, PickScore, ImageReward, HPSv2 and HPSv3 — what i2l's Table-1 preference scorers read
(i2l/eval/metrics/plugins.py); the original-layout replicas above stay as replicas of those releases."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from i2l.replicas.common import clip_tokenizer_files, seeded, write_json
from i2l.replicas.sources import PUBLISHED

_OPENAI_MEAN = PUBLISHED["CLIP-ViT-H-14-laion2B-s32B-b79K"]["configs"]["preprocessor_config.json"]["image_mean"]
_OPENAI_STD = PUBLISHED["CLIP-ViT-H-14-laion2B-s32B-b79K"]["configs"]["preprocessor_config.json"]["image_std"]

# Tiny stand-ins of open_clip's model_configs/ViT-H-14.json and ViT-L-14-quickgelu.json: published image size,
# patch, context length, vocabulary (open_clip's tokenizer is fixed at 49,408) and quick_gelu; tiny towers.
# ViT-L/14 keeps embed_dim 768 so the published-size aesthetic MLP reads its embeddings.
OPEN_CLIP_ARCHS = {
    "ViT-H-14-replica": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "ViT-L-14-quickgelu-replica": {
        "embed_dim": 768, "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
}


def register_open_clip_archs() -> dict[str, str]:
    """Register the replicas' tiny open_clip architectures (published name -> registered replica name), so a
    replica's checkpoint loads with `create_model_and_transforms(<replica name>, pretrained=<file>)`."""
    import open_clip

    if not set(OPEN_CLIP_ARCHS) <= set(open_clip.list_models()):
        # open_clip reads the files when they are added and keeps the configs in its registry: the folder can go
        # (a later rescan skips a path that no longer exists and keeps what it registered)
        with tempfile.TemporaryDirectory(prefix="i2l-open-clip-archs-") as folder:
            for name, cfg in OPEN_CLIP_ARCHS.items():
                write_json(Path(folder) / f"{name}.json", cfg)
            open_clip.add_model_config(folder)
    return {"ViT-H-14": "ViT-H-14-replica", "ViT-L-14-quickgelu": "ViT-L-14-quickgelu-replica"}


def _open_clip_model(arch: str):
    import open_clip

    register_open_clip_archs()
    seeded()
    return open_clip.create_model(arch, pretrained=None).eval()


def _open_clip_dir(out_dir: Path, arch: str) -> nn.Module:
    """open_clip_config.json ({model_cfg, preprocess_cfg}) + open_clip_model.safetensors, as open_clip's hub
    layout has them (the files `local-dir:` / `hf-hub:` loading reads)."""
    from safetensors.torch import save_file

    model = _open_clip_model(arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "open_clip_model.safetensors"))
    write_json(out_dir / "open_clip_config.json",
               {"model_cfg": OPEN_CLIP_ARCHS[arch], "preprocess_cfg": {"mean": _OPENAI_MEAN, "std": _OPENAI_STD}})
    return model


def _clip_processor(out_dir: Path) -> int:
    """The transformers CLIP processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (which PickScore's model
    card loads): preprocessor_config.json, tokenizer files. Returns the tokenizer's vocabulary size."""
    from transformers import CLIPTokenizer

    vocab = clip_tokenizer_files(out_dir)
    # transformers 5 takes the vocabulary itself (`vocab_file=` would be ignored: every text one unknown token)
    tok = CLIPTokenizer(vocab=json.loads((out_dir / "vocab.json").read_text()), merges=[], model_max_length=77)
    tok.save_pretrained(out_dir)
    write_json(out_dir / "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                     "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    write_json(out_dir / "preprocessor_config.json", {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": _OPENAI_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": _OPENAI_STD, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}, "processor_class": "CLIPProcessor"})
    return vocab


def _hf_clip(vocab: int):
    """A transformers CLIPModel with CLIP-ViT-H-14's non-size config values (gelu, eps 1e-5, 224 px, patch 14,
    77 positions, logit scale init 2.6592), tiny towers."""
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    cfg = CLIPConfig(text_config={**tower, "vocab_size": vocab, "max_position_embeddings": 77},
                     vision_config={**tower, "image_size": 224, "patch_size": 14},
                     projection_dim=32, logit_scale_init_value=2.6592)
    seeded()
    return CLIPModel(cfg).eval()


def clip_vit_h_14_laion2b(out_dir: Path) -> Path:
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K: open_clip files (the scorer reads open_clip_model.safetensors
    through `local-dir:`) plus the transformers CLIPModel and processor files of the same repo. The two weight
    sets are separate tiny models here (the published ones are the same network in two key namings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _open_clip_dir(out_dir, "ViT-H-14-replica")
    vocab = _clip_processor(out_dir)
    _hf_clip(vocab).save_pretrained(out_dir)
    return out_dir


def pickscore_v1(out_dir: Path) -> Path:
    """yuvalkirstain/PickScore_v1 (a CLIPModel: config.json + model.safetensors) and, beside it in
    `processor/`, the CLIP-ViT-H-14 processor files its model card loads it with."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _clip_processor(out_dir / "processor")
    _hf_clip(vocab).save_pretrained(out_dir)
    return out_dir


def laion_aesthetic(out_dir: Path) -> Path:
    """sac+logos+ava1-l14-linearMSE.pth (published sizes: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, a torch.save of
    the state dict: plain tensors, readable with weights_only=True) and, in clip-vit-large-patch14/, the OpenAI
    CLIP ViT-L/14 it scores embeddings of, in open_clip's layout (timm/vit_large_patch14_clip_224.openai). OpenAI's
    own ViT-L-14.pt is TorchScript, which weights_only loading refuses."""
    out_dir = Path(out_dir)
    (out_dir / "clip-vit-large-patch14").mkdir(parents=True, exist_ok=True)
    _open_clip_dir(out_dir / "clip-vit-large-patch14", "ViT-L-14-quickgelu-replica")
    seeded()
    mlp = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    torch.save(state, out_dir / "sac+logos+ava1-l14-linearMSE.pth")
    return out_dir


def hpsv2_1(out_dir: Path) -> Path:
    """HPS_v2.1_compressed.pt: {"state_dict": <open_clip ViT-H-14 state dict>}, a pickle of plain tensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _open_clip_model("ViT-H-14-replica")
    torch.save({"state_dict": model.state_dict()}, out_dir / "HPS_v2.1_compressed.pt")
    return out_dir


def open_clip_config(path: Path) -> dict:
    return json.loads((Path(path) / "open_clip_config.json").read_text())


# ----- DiffSynth-Studio/ImageMetrics: the authors' converted single-folder layout, read by i2l through
# diffsynth.metrics' model classes (i2l/eval/metrics/plugins.py) ------------------------------------------

IMAGE_REWARD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _save_safetensors(state: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))


def _diffsynth_clip_config(vocab: int) -> dict:
    """CLIPConfig of a tiny ViT-H-14-kind CLIP (the non-size values of the laion/PickScore config.json: gelu,
    eps 1e-5, 224 px, patch 14, 77 positions, CLIP's legacy eos id 2), matching OPEN_CLIP_ARCHS["ViT-H-14-replica"]
    (width 32, head width 16, 1 layer, mlp ratio 4, embed 32) so open_clip weights convert into it."""
    tower = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}
    return {"projection_dim": 32, "logit_scale_init_value": 2.6592,
            "text_config": {**tower, "vocab_size": vocab, "max_position_embeddings": 77, "bos_token_id": 0,
                            "eos_token_id": 2, "pad_token_id": 1},
            "vision_config": {**tower, "image_size": 224, "patch_size": 14}}


def _im_aesthetic(out: Path) -> None:
    """Aesthetic/: model.safetensors with diffsynth.models.aesthetic.AestheticModel's keys (vision_model.
    vision_model.*, visual_projection.weight, layers.{0,2,4,6,7}.*: DiffSynth loads it strictly), config.json
    (its CLIPVisionConfig: OpenAI ViT-L/14's quick_gelu, 224 px, patch 14, projection 768 so the MLP keeps its
    published 768 -> ... -> 1 sizes) and preprocessor_config.json (CLIPImageProcessor)."""
    from diffsynth.models.aesthetic import AestheticMLP, AestheticModel
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           projection_dim=768)
    seeded()
    vision = CLIPVisionModel(cfg)
    model = AestheticModel(AestheticMLP(768), vision, nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False))
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(model.state_dict(), out / "model.safetensors")
    cfg.save_pretrained(out)
    _preprocessor(out)


def _preprocessor(out: Path) -> None:
    write_json(out / "preprocessor_config.json", {
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": _OPENAI_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": _OPENAI_STD, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": 224}, "processor_class": "CLIPProcessor"})


def _im_pickscore(out: Path) -> None:
    """PickScore/: a transformers CLIPModel (config.json + model.safetensors, PickScore_v1's key names) with the
    CLIP processor files beside it (DiffSynth reads both from the one folder)."""
    from transformers import CLIPConfig, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    vocab = _clip_processor(out)
    seeded()
    CLIPModel(CLIPConfig(**_diffsynth_clip_config(vocab))).eval().save_pretrained(out)


def _im_hpsv2(out: Path) -> None:
    """HPSv2/: model.safetensors = HPS_v2.1's open_clip ViT-H-14 state dict (open_clip key names: DiffSynth
    converts them with ImageMetricsOpenCLIPStateDictConverter), config.json = the CLIPConfig it converts into
    (sizes of the tiny open_clip arch), CLIP processor files."""
    from transformers import CLIPConfig

    out.mkdir(parents=True, exist_ok=True)
    _clip_processor(out)
    model = _open_clip_model("ViT-H-14-replica")
    _save_safetensors(model.state_dict(), out / "model.safetensors")
    # open_clip's tokenizer is fixed at 49,408 ids: the converted text tower keeps that vocabulary
    CLIPConfig(**_diffsynth_clip_config(49408)).save_pretrained(out)


def _bert_vocab(out: Path) -> int:
    """vocab.txt of a tiny uncased WordPiece vocabulary (BERT's special tokens, lowercase letters, digits and
    punctuation, each also as a ## continuation) and the tokenizer files BertTokenizer.save_pretrained writes."""
    from transformers import BertTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'-:;()")
    tokens = [*IMAGE_REWARD_SPECIALS, *chars, *(f"##{c}" for c in chars)]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tok.save_pretrained(out)  # tokenizer.json, tokenizer_config.json (transformers 5 writes no vocab.txt)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")  # the slow tokenizer's file, as published
    if (out / "special_tokens_map.json").exists():  # not in the published folder
        (out / "special_tokens_map.json").unlink()
    return len(tokens)


def _blip_to_original(key: str) -> str:
    """Inverse of DiffSynth's ImageRewardModel.convert_key_value for the vision tower: HF BLIP names -> the BLIP
    (timm ViT) names ImageReward.pt uses, which the published model.safetensors keeps."""
    vis = "blip.vision_model."
    if not key.startswith(vis):
        return key
    rest = key[len(vis):]
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed"}
    if rest in fixed:
        return "blip.visual_encoder." + fixed[rest]
    for src, dst in (("embeddings.patch_embedding.", "patch_embed.proj."), ("post_layernorm.", "norm.")):
        if rest.startswith(src):
            return "blip.visual_encoder." + dst + rest[len(src):]
    layer, sub = rest[len("encoder.layers."):].split(".", 1)
    for src, dst in (("layer_norm1.", "norm1."), ("self_attn.qkv.", "attn.qkv."),
                     ("self_attn.projection.", "attn.proj."), ("layer_norm2.", "norm2."), ("mlp.", "mlp.")):
        if sub.startswith(src):
            return f"blip.visual_encoder.blocks.{layer}.{dst}{sub[len(src):]}"
    raise KeyError(key)


def _im_image_reward(out: Path) -> None:
    """ImageReward/: model.safetensors (ImageReward.pt's keys: blip.visual_encoder.* timm-ViT names, blip.
    text_encoder.* BERT names, mlp.layers.*; DiffSynth adds the zero ITM head itself), med_config.json (BLIP's
    BertConfig: its text tower's sizes, encoder_width = vision width), BertTokenizer files (vocab.txt, tokenizer.
    json, tokenizer_config.json). Vision: ViT-L/16's kind (patch 16, 224 px, eps 1e-6), head width 64."""
    from diffsynth.models.image_reward import ImageRewardModel
    from transformers import BlipConfig, BlipForImageTextRetrieval

    out.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab(out) + 2  # + [DEC] and [ENC], which DiffSynth (and ImageReward) add to the tokenizer
    text = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
            "num_attention_heads": 1, "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab, "encoder_width": 64, "add_cross_attention": True,
            "bos_token_id": vocab - 2, "sep_token_id": IMAGE_REWARD_SPECIALS.index("[SEP]")}
    write_json(out / "med_config.json", text)
    cfg = BlipConfig(vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                    "num_attention_heads": 1, "image_size": 224, "patch_size": 16,
                                    "hidden_act": "gelu", "layer_norm_eps": 1e-6},
                     text_config={k: v for k, v in text.items() if k not in ("architectures", "model_type",
                                                                             "encoder_width")}
                     | {"encoder_hidden_size": 64, "is_decoder": True}, projection_dim=32)
    seeded()
    model = ImageRewardModel(blip=BlipForImageTextRetrieval(cfg))
    # DiffSynth's MLP init (std 1/(D+1)) makes a tiny random model's rewards equal to ~1e-6: nn.Linear's default
    # init lets every input show in the score
    for layer in model.mlp.layers:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    state = {_blip_to_original(k): v for k, v in model.state_dict().items() if not k.startswith("blip.itm_head.")}
    _save_safetensors(state, out / "model.safetensors")


# Qwen2-VL's vision special tokens (tokenizer_config.json of Qwen/Qwen2-VL-7B-Instruct) and a chat template that
# renders an image item as Qwen2-VL's does (<|vision_start|><|image_pad|><|vision_end|>); the published template
# is longer (system prompt, videos), not copied here.
QWEN2VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
QWEN2VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _to_hpsv3_published(key: str) -> str:
    """Inverse of DiffSynth's ImageMetricsHPSv3StateDictConverter: transformers 5 Qwen2-VL names -> the
    pre-4.52 names (visual.*, model.layers.*) HPSv3's checkpoint was saved with."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def _im_hpsv3(out: Path) -> None:
    """HPSv3/: model.safetensors (Qwen2-VL + the ranknet reward head rm_head.{0,3,5}, output 2 = (mu, sigma)),
    config.json (its Qwen2VLConfig, vocabulary = tokenizer + <|Reward|>, which DiffSynth adds), the Qwen2-VL
    processor files (preprocessor_config.json, tokenizer files, chat template)."""
    from diffsynth.models.hpsv3 import HPSv3Qwen2VLRewardModel
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from i2l.replicas.common import QWEN_SPECIALS, qwen_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer(out)
    tok.add_tokens(list(QWEN2VL_SPECIALS), special_tokens=True)
    image = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)  # Qwen2-VL's published values
    Qwen2VLProcessor(image_processor=image, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=QWEN2VL_CHAT_TEMPLATE).save_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    write_json(out / "added_tokens.json", {t: tok.convert_tokens_to_ids(t) for t in (*QWEN_SPECIALS, *ids)})
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(tok) + 1, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                     "rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [2, 3, 3],
                                         "rope_theta": 1000000.0}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 4, "num_heads": 2,
                       "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    cfg.text_config.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg.text_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    image.save_pretrained(out)  # preprocessor_config.json, the published name (transformers 5 also embeds it)
    seeded()
    model = HPSv3Qwen2VLRewardModel(config=cfg, output_dim=2, rm_head_kwargs={"hidden_size": 16})
    _save_safetensors({_to_hpsv3_published(k): v for k, v in model.state_dict().items()}, out / "model.safetensors")
    cfg.save_pretrained(out)


IMAGE_METRICS = {"Aesthetic": _im_aesthetic, "PickScore": _im_pickscore, "ImageReward": _im_image_reward,
                 "HPSv2": _im_hpsv2, "HPSv3": _im_hpsv3}


def diffsynth_image_metrics(out_dir: Path) -> Path:
    """DiffSynth-Studio/ImageMetrics: one folder per metric (Aesthetic/, PickScore/, ImageReward/, HPSv2/, HPSv3/),
    each model.safetensors + its tokenizer / processor files, as diffsynth.metrics' from_pretrained reads them."""
    out_dir = Path(out_dir)
    for name, write in IMAGE_METRICS.items():
        write(out_dir / name)
    return out_dir
