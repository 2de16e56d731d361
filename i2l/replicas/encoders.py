"""Replicas of the image encoders: google/siglip2-so400m-patch16-512 (FixRes, published as a whole `SiglipModel`,
model_type siglip) and google/siglip2-so400m-patch16-naflex (NaFlex, a whole `Siglip2Model`, model_type
siglip2), each with its processor and Gemma tokenizer files, tiny widths and depths."""

from __future__ import annotations

from pathlib import Path

from i2l.replicas.common import gemma_tokenizer, seeded, write_json
from i2l.replicas.sources import PUBLISHED

_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


def _configs(name: str) -> tuple[dict, dict, dict]:
    c = PUBLISHED[name]["configs"]
    strip = lambda d: {k: v for k, v in d.items() if k != "model_type"}
    return c["config.json"], strip(c["config.json:vision_config"]), strip(c["config.json:text_config"])


def _tokenizer_files(out_dir: Path) -> int:
    tok = gemma_tokenizer(out_dir)
    # transformers 5 no longer writes special_tokens_map.json; the published folder has it
    write_json(out_dir / "special_tokens_map.json", {"bos_token": "<bos>", "eos_token": "<eos>",
                                                     "pad_token": "<pad>", "unk_token": "<unk>"})
    return len(tok)


def _preprocessor(out_dir: Path, name: str) -> None:
    """preprocessor_config.json with the published keys (written as published; the processor classes of
    transformers 5 would write processor_config.json instead)."""
    write_json(out_dir / "preprocessor_config.json",
               {"do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
                **PUBLISHED[name]["configs"]["preprocessor_config.json"]})


def siglip2_so400m_patch16_512(out_dir: Path) -> Path:
    """FixRes SigLIP2 at 512 px, patch 16 (1,024 patch tokens): conv patch embedding, fixed positions. Weights
    float32, one model.safetensors (4.55 GB published). The published tokenizer.model is not written."""
    from transformers import SiglipConfig, SiglipModel

    name, out_dir = "siglip2-so400m-patch16-512", Path(out_dir)
    top, vision, text = _configs(name)
    seeded()
    vocab = _tokenizer_files(out_dir)
    cfg = SiglipConfig(text_config={**text, **_TOWER, "vocab_size": vocab},
                       vision_config={**vision, **_TOWER},
                       initializer_factor=top["initializer_factor"])
    SiglipModel(cfg).eval().save_pretrained(out_dir)
    _preprocessor(out_dir, name)
    return out_dir


def siglip2_so400m_patch16_naflex(out_dir: Path) -> Path:
    """NaFlex SigLIP2, patch 16, position grid of num_patches = 256 (16×16, resized to each image's grid) and a
    processor budget of max_num_patches = 256."""
    from transformers import Siglip2Config, Siglip2Model

    name, out_dir = "siglip2-so400m-patch16-naflex", Path(out_dir)
    _, vision, text = _configs(name)
    seeded()
    vocab = _tokenizer_files(out_dir)
    cfg = Siglip2Config(text_config={**text, **_TOWER, "vocab_size": vocab}, vision_config={**vision, **_TOWER})
    Siglip2Model(cfg).eval().save_pretrained(out_dir)
    _preprocessor(out_dir, name)
    return out_dir
