"""Replicas of the backbone pipelines the presets name: FLUX.2-klein-base-4B / FLUX.2-klein-4B (`klein4b`) and
Z-Image / Z-Image-Turbo (`zimage`), in the diffusers layout they are published in, with tiny sizes. Every
non-size value comes from `sources.PUBLISHED` (where it was read: `sources.SOURCES`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from i2l.replicas.common import qwen_tokenizer, save_sharded, seeded, write_json
from i2l.replicas.sources import PUBLISHED


def _published(name: str, file: str) -> dict:
    return {k: v for k, v in PUBLISHED[name]["configs"][file].items() if k != "_class_name"}


def _qwen3_text_encoder(vocab: int, layers: int):
    """Qwen3ForCausalLM as both pipelines' text_encoder/ holds it (Z-Image's model_index names Qwen3Model, the
    weights keep the causal LM's `model.` keys). Published: Qwen3-4B, bfloat16; ids from Qwen/Qwen3-4B."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=40960,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_bias=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      bos_token_id=151643, eos_token_id=151645)  # UNVERIFIED ids, as Qwen3-4B's config.json
    return Qwen3ForCausalLM(cfg).to(torch.bfloat16).eval()


def _patch_json(path: Path, **values) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    write_json(path, data)


def _flux2_klein(out_dir: Path, name: str) -> Path:
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    out_dir = Path(out_dir)
    seeded()
    tokenizer = qwen_tokenizer(out_dir / "tokenizer")
    # 27 layers: the klein pipeline stacks the text encoder's hidden states 9, 18 and 27 (its defaults)
    text_encoder = _qwen3_text_encoder(len(tokenizer), layers=27)
    transformer = Flux2Transformer2DModel(
        **_published(name, "transformer/config.json"), num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=3 * text_encoder.config.hidden_size,
        timestep_guidance_channels=32, axes_dims_rope=(8, 8, 8, 8)).to(torch.bfloat16)
    vae = AutoencoderKLFlux2(**_published(name, "vae/config.json"), block_out_channels=(32, 32, 32, 32),
                             layers_per_block=1, norm_num_groups=32).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(**_published(name, "scheduler/scheduler_config.json"))
    distilled = PUBLISHED[name]["configs"]["model_index.json"]["is_distilled"]
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=distilled)
    pipe.save_pretrained(out_dir)
    # published: text_encoder in 2 shards with model.safetensors.index.json; the transformer is one file
    shutil.rmtree(out_dir / "text_encoder")
    save_sharded(text_encoder, out_dir / "text_encoder", shards=2)
    qwen_tokenizer(out_dir / "tokenizer")  # the pipeline's save keeps only transformers 5's tokenizer files
    # transformers 5 has one Qwen2Tokenizer class; the published index names the fast one
    _patch_json(out_dir / "model_index.json", tokenizer=["transformers", "Qwen2TokenizerFast"])
    return out_dir


def flux2_klein_base_4b(out_dir: Path) -> Path:
    """black-forest-labs/FLUX.2-klein-base-4B: the undistilled model the paper trains on (is_distilled false).
    The published repo also holds BFL's single-file `flux-2-klein-base-4b.safetensors` (BFL key names), not
    replicated: i2l reads the diffusers layout."""
    return _flux2_klein(out_dir, "FLUX.2-klein-base-4B")


def flux2_klein_4b(out_dir: Path) -> Path:
    """black-forest-labs/FLUX.2-klein-4B: the step-distilled model (is_distilled true; diffusers samples it
    without CFG). Its BFL single file `flux-2-klein-4b.safetensors` is not replicated."""
    return _flux2_klein(out_dir, "FLUX.2-klein-4B")


def _zimage(out_dir: Path, name: str, transformer_shards: int, transformer_dtype: torch.dtype) -> Path:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )

    out_dir = Path(out_dir)
    seeded()
    tokenizer = qwen_tokenizer(out_dir / "tokenizer")
    text_encoder = _qwen3_text_encoder(len(tokenizer), layers=2)  # the pipeline reads hidden_states[-2]
    # dim / n_heads = sum(axes_dims): 64 / 2 = 8 + 12 + 12
    transformer = ZImageTransformer2DModel(
        **_published(name, "transformer/config.json"), dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=text_encoder.config.hidden_size, axes_dims=[8, 12, 12]).to(transformer_dtype)
    vae = AutoencoderKL(**_published(name, "vae/config.json"), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False).to(torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(**_published(name, "scheduler/scheduler_config.json"))
    # model_index names Qwen3Model: give the pipeline the bare model, then write the causal LM's files
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder.model, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(out_dir)
    shutil.rmtree(out_dir / "transformer")
    save_sharded(transformer, out_dir / "transformer", shards=transformer_shards)
    shutil.rmtree(out_dir / "text_encoder")
    save_sharded(text_encoder, out_dir / "text_encoder", shards=3)
    _zimage_tokenizer(out_dir / "tokenizer")
    return out_dir


def _zimage_tokenizer(tok_dir: Path) -> None:
    """Z-Image's tokenizer/ holds tokenizer.json, tokenizer_config.json (chat template inside), vocab.json and
    merges.txt only."""
    shutil.rmtree(tok_dir)
    qwen_tokenizer(tok_dir)
    template = (tok_dir / "chat_template.jinja").read_text()
    _patch_json(tok_dir / "tokenizer_config.json", chat_template=template)
    for extra in ("chat_template.jinja", "added_tokens.json", "special_tokens_map.json"):
        (tok_dir / extra).unlink()


def z_image(out_dir: Path) -> Path:
    """Tongyi-MAI/Z-Image (the undistilled base): transformer in 2 bf16 shards, scheduler shift 6."""
    return _zimage(out_dir, "Z-Image", transformer_shards=2, transformer_dtype=torch.bfloat16)


def z_image_turbo(out_dir: Path) -> Path:
    """Tongyi-MAI/Z-Image-Turbo (distilled, guidance 0): transformer in 3 shards (24.6 GB for 6.15 B
    parameters = float32), scheduler shift 3."""
    return _zimage(out_dir, "Z-Image-Turbo", transformer_shards=3, transformer_dtype=torch.float32)
