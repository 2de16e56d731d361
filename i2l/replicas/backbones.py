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


# Qwen3-VL's added tokens at their ids from 151643 (Qwen/Qwen3-VL tokenizer_config.json), then the five
# HiDream-O1 adds: DiffSynth's model finds the timestep token at 151673 (`tms_token_id`, hard-coded), and the
# pipeline's `add_special_tokens` names them in this order.
QWEN3_VL_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
)
HIDREAM_SPECIALS = ("<|boi_token|>", "<|bor_token|>", "<|eor_token|>", "<|bot_token|>", "<|tms_token|>")
QWEN_FIRST_SPECIAL = 151643
# Qwen3-VL's template in ChatML shape (string or image/text list content); the published one is longer (tools,
# video), not copied here
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hidream_tokenizer():
    """A byte-level BPE tokenizer (no merges) whose special tokens sit at Qwen3-VL's / HiDream-O1's real ids: the
    byte vocabulary is filled with never-produced placeholders up to 151643."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    from i2l.replicas.common import _bytes_to_unicode

    chars = sorted(_bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab.update({f"<|replica_{i}|>": i for i in range(len(chars), QWEN_FIRST_SPECIAL)})
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             unk_token=None, bos_token=None, errors="replace", model_max_length=262144,
                             split_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN3_VL_SPECIALS + HIDREAM_SPECIALS)})
    return tok


def _save_state_dict_sharded(state_dict: dict, out_dir: Path, shards: int) -> None:
    """huggingface_hub's `save_torch_state_dict` with exactly `shards` files (model-0000k-of-0000N.safetensors and
    model.safetensors.index.json): a max_shard_size that gives that many, searched in a scratch dir (downwards:
    the tiny model's two vocabulary matrices take a shard each whatever the size)."""
    import tempfile

    from huggingface_hub import save_torch_state_dict

    size = sum(t.numel() * t.element_size() for t in state_dict.values()) // shards + 1
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(200):
            trial = Path(tmp) / f"s{size}"
            trial.mkdir()
            save_torch_state_dict(state_dict, trial, max_shard_size=size)
            count = len(list(trial.glob("*.safetensors")))
            if count == shards:
                shutil.copytree(trial, out_dir, dirs_exist_ok=True)
                return
            if count > shards:
                break
            size = int(size * 0.9)
    raise RuntimeError(f"could not save the state dict in exactly {shards} shards")


def hidream_o1_image(out_dir: Path) -> Path:
    """HiDream-ai/HiDream-O1-Image: one transformers-style folder (config.json, model-0000k-of-00004.safetensors
    + model.safetensors.index.json, Qwen3-VL processor files) that DiffSynth reads with
    ModelConfig(origin_file_pattern="model-*.safetensors") and AutoProcessor. The model is DiffSynth's
    HiDreamO1ImageModel with tiny sizes, saved by its own save_pretrained."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from i2l.backbones.hidream_o1 import build_transformer

    out_dir = Path(out_dir)
    seeded()
    # head_dim 8: the rotary split (t, h, w) = (2, 1, 1) sums to head_dim / 2, as (24, 20, 20) does for 128
    arch = {"text_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
                            "rope_scaling": {"mrope_section": [2, 1, 1]}},
            "vision_config": {"hidden_size": 16, "depth": 1, "num_heads": 2, "intermediate_size": 32,
                              "out_hidden_size": 32, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}}
    model = build_transformer(arch).to(torch.bfloat16)
    # DiffSynth's class cannot save_pretrained under transformers 5 (its `_tied_weights_keys` is a list): its
    # config saves itself, the weights go through huggingface_hub's sharded writer (the names save_pretrained uses)
    _save_state_dict_sharded(model.state_dict(), out_dir, PUBLISHED["HiDream-O1-Image"]["shards"])
    model.config.save_pretrained(out_dir)
    _patch_json(out_dir / "config.json", architectures=["Qwen3VLForConditionalGeneration"])
    tokenizer = _hidream_tokenizer()
    pre = _published("HiDream-O1-Image", "preprocessor_config.json")
    image_processor = Qwen2VLImageProcessor(**{k: pre[k] for k in ("size", "patch_size", "temporal_patch_size",
                                                                   "merge_size", "image_mean", "image_std")})
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN3_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    # transformers 5 folds the processors' configs into processor_config.json; the published folder (written
    # before it) has them as preprocessor_config.json / video_preprocessor_config.json, and the slow tokenizer's
    # vocab.json + merges.txt
    (out_dir / "processor_config.json").unlink()
    image_processor.save_pretrained(out_dir)
    processor.video_processor.save_pretrained(out_dir)
    _patch_json(out_dir / "preprocessor_config.json", processor_class="Qwen3VLProcessor")
    write_json(out_dir / "vocab.json", {t: i for t, i in tokenizer.get_vocab().items() if i < QWEN_FIRST_SPECIAL})
    (out_dir / "merges.txt").write_text("#version: 0.2\n")
    return out_dir
