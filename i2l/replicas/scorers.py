"""Replicas of the scorers' checkpoints: open_clip ViT-H-14 laion2b_s32b_b79k (the CLIP scorer; also the CLIP
processor PickScore uses), PickScore_v1, the LAION aesthetic MLP with its OpenAI CLIP ViT-L/14, and HPSv2.1.
open_clip weights are written as safetensors only (open_clip_model.safetensors; the hub also publishes
open_clip_pytorch_model.bin, a pickle). The aesthetic MLP and HPSv2.1 are published only as torch pickles of
plain tensors: their replicas are such pickles too, which i2l reads with torch.load(weights_only=True)."""

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

    folder = Path(tempfile.mkdtemp(prefix="i2l-open-clip-archs-"))
    for name, cfg in OPEN_CLIP_ARCHS.items():
        write_json(folder / f"{name}.json", cfg)
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
    tok = CLIPTokenizer(vocab_file=str(out_dir / "vocab.json"), merges_file=str(out_dir / "merges.txt"),
                        model_max_length=77)
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
