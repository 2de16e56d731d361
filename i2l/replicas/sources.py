"""The published facts each replica copies, with where each was read. Values marked UNVERIFIED could not be
checked against the published file from this (offline) machine; sizes (layers, widths, heads, vocab) are never
copied, so they are not listed. Tests compare every replica against these dicts."""

from __future__ import annotations

# Where facts were read (the code corpus of the search tool, installed libraries, project notes).
SOURCES = {
    "flux2.layout": "github scripts that download black-forest-labs/FLUX.2-klein-4B file by file (text_encoder/"
                    "model-0000{1,2}-of-00002.safetensors + index, transformer/diffusion_pytorch_model.safetensors, "
                    "tokenizer/{added_tokens.json,chat_template.jinja,merges.txt,special_tokens_map.json,"
                    "tokenizer.json,tokenizer_config.json,vocab.json}, vae/...); base-4B assumed identical (UNVERIFIED)",
    "flux2.transformer": "huggingface/diffusers scripts/convert_flux2_to_diffusers.py (klein-4b config); a third-"
                         "party pin 'verbatim from FLUX.2-klein-base-4B transformer/config.json, byte-identical to "
                         "the distilled one'",
    "flux2.model_index": "diffusers 0.42 Flux2KleinPipeline.__init__ (component classes, is_distilled); NOTES.md "
                         "(klein-4B: is_distilled true)",
    "flux2.vae": "convert_flux2_to_diffusers.py builds AutoencoderKLFlux2() with its defaults (diffusers 0.42)",
    "flux2.scheduler": "convert_flux2_to_diffusers.py copies FLUX.1-dev's scheduler (shift 3, dynamic shifting, "
                       "base/max shift 0.5/1.15, seq len 256/4096); klein's own scheduler_config.json UNVERIFIED",
    "qwen3_4b": "Z-Image.swift docs/z-image.md (text_encoder: Qwen3ForCausalLM, 36 layers, hidden 2560, 32/8 heads, "
                "max_position_embeddings 40960, bfloat16, vocab 151936); a C port's flux_qwen3.h (rope_theta 1e6, "
                "rms_norm_eps 1e-6); tie_word_embeddings / token ids from Qwen/Qwen3-4B (UNVERIFIED here)",
    "zimage.layout": "zhutao100/Z-Image.swift docs/z-image.md and docs/z-image-turbo.md (Hub listings: transformer "
                     "2 shards (Z-Image) / 3 shards (Turbo), text_encoder 3 shards, tokenizer files, vae single)",
    "zimage.transformer": "diffusers 0.42 ZImageTransformer2DModel defaults, matching the values docs/z-image.md "
                          "quotes from transformer/config.json (patch [2]/[1], qk_norm, norm_eps 1e-5, rope 256)",
    "zimage.scheduler": "docs/z-image.md (shift 6.0, no dynamic shifting) and docs/z-image-turbo.md (shift 3.0)",
    "zimage.vae": "docs/z-image.md (AutoencoderKL, latent 16, scaling 0.3611, shift 0.1159, sample 1024, "
                  "force_upcast); block layout = FLUX.1's VAE (UNVERIFIED)",
    "siglip2.fixres": "google/siglip2-so400m-patch16-512 listing (config.json, model.safetensors 4.55 GB, "
                      "preprocessor_config.json, special_tokens_map.json, tokenizer.json, tokenizer.model, "
                      "tokenizer_config.json); config keys from google/siglip2-base-patch16-512's mirrored config "
                      "(model_type siglip, image_size 512, vocab 256000); preprocessor_config.json as mirrored (394 B)",
    "siglip2.naflex": "huggingface/transformers convert_siglip2_to_hf.py (Siglip2Config, patch 16, num_patches, "
                      "Gemma tokenizer: add_eos, no bos, right padding); preprocessor_config.json from a duplicate of "
                      "google/siglip2-so400m-patch16-naflex (Siglip2ImageProcessorFast, max_num_patches 256)",
    "open_clip": "open_clip 3.3 pretrained.py (ViT-H-14 laion2b_s32b_b79k -> hf_hub laion/CLIP-ViT-H-14-laion2B-"
                 "s32B-b79K; ViT-L-14 openai -> timm/vit_large_patch14_clip_224.openai, quick_gelu) and "
                 "constants.py (open_clip_pytorch_model.bin, open_clip_model.safetensors, open_clip_config.json); "
                 "model_configs/ViT-H-14.json, ViT-L-14-quickgelu.json",
    "laion_vit_h_14.hf": "mirror listings of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (config.json, "
                         "open_clip_pytorch_model.bin, preprocessor_config.json, pytorch_model.bin, "
                         "special_tokens_map.json, tokenizer.json, tokenizer_config.json, vocab.json)",
    "pickscore": "yuvalkirstain/PickScore_v1: a transformers CLIPModel fine-tuned from CLIP-ViT-H-14, used with the "
                 "laion CLIP-ViT-H-14 processor (its model card); the file list (model.safetensors) UNVERIFIED",
    "aesthetic": "LAION improved-aesthetic-predictor: sac+logos+ava1-l14-linearMSE.pth = torch.save(state_dict) of "
                 "MLP(768) with layers.{0,2,4,6,7} (diffsynth.models.aesthetic.AestheticMLP), over OpenAI CLIP "
                 "ViT-L/14 image embeddings",
    "hidream_o1.layout": "DiffSynth 2.1.12 (configs/model_configs.py: ModelConfig(model_id=\"HiDream-ai/HiDream-O1-Image\", "
                         "origin_file_pattern=\"model-*.safetensors\"); pipelines/hidream_o1_image.py: AutoProcessor "
                         "from the repo root) and HiDream-ai/HiDream-O1-Image inference.py (AutoProcessor and "
                         "Qwen3VLForConditionalGeneration.from_pretrained(model_path)); shard count 4 (8.8 B bf16 "
                         "params in 5 GB shards) and the processor file list UNVERIFIED",
    "hidream_o1.config": "DiffSynth 2.1.12 models/hidream_o1_image_dit.py _build_hidream_config (token ids, rope "
                         "theta 5e6, rms eps, mrope interleaved; sizes not copied) and Qwen3VLModel (tms_token_id "
                         "151673); architectures = Qwen3VLForConditionalGeneration as inference.py loads it "
                         "(UNVERIFIED)",
    "hidream_o1.processor": "Qwen3-VL's preprocessor_config.json (Qwen2VLImageProcessorFast, patch 16, merge 2, "
                            "temporal 2, mean/std 0.5) and tokenizer ids (added tokens from 151643), HiDream-O1's five "
                            "added tokens after </think> (their order as add_special_tokens names them) UNVERIFIED",
    "diffsynth.image_metrics": "DiffSynth-Studio/ImageMetrics as diffsynth 2.1.12 reads it (diffsynth/metrics/*.py "
                               "from_pretrained: <Metric>/model.safetensors + tokenizer / processor files from the "
                               "same folder; configs/model_configs.py image_metrics_series; utils/state_dict_converters/"
                               "image_metrics.py; DiffSynth loads strictly, so a file's converted keys are the model "
                               "class's state-dict keys); ImageReward/ listing from the mirror achiru/DiffSynth-Studio-"
                               "ImageMetrics (config.json 570 B, med_config.json, model.safetensors, tokenizer.json, "
                               "tokenizer_config.json, vocab.txt). The other folders' listings are UNVERIFIED (the "
                               "files named are what from_pretrained reads); whether they hold a config.json is "
                               "UNVERIFIED: i2l reads one when present (the replicas write it), else DiffSynth's full-"
                               "size default. The original key layouts are inferred from the converters (ImageReward: "
                               "ImageReward.pt's timm/BERT names; HPSv2: open_clip names; HPSv3: pre-4.52 Qwen2-VL "
                               "names visual.* / model.layers.*): UNVERIFIED against the files",
    "imagereward": "diffsynth.models.image_reward (ImageRewardModel: BLIP ViT-L/16 + BERT-base text encoder with "
                   "cross attention, MLP 768->1024->128->64->16->1, reward standardised with mean 0.16717362830052426,"
                   " std 1.0333394966054072; _load_text_config = BLIP's med_config.json values); ImageReward's "
                   "config.json content UNVERIFIED and not read by i2l (the replica omits it)",
    "hpsv3": "diffsynth.models.hpsv3 (HPSv3Qwen2VLRewardModel: Qwen2-VL-7B, vocab 151658 = tokenizer + <|Reward|>, "
             "ranknet head hidden 1024 -> 16 -> 2 = (mu, sigma)); Qwen2-VL processor values (min_pixels 56*56, "
             "max_pixels 28*28*1280, patch 14, merge 2, temporal 2) from Qwen/Qwen2-VL-7B-Instruct (UNVERIFIED here)",
    "hpsv2": "public HPSv2 scorers: xswu/HPSv2 HPS_v2.1_compressed.pt is torch.load(..., weights_only=True)"
             "['state_dict'] into open_clip create_model('ViT-H-14'); its dtype UNVERIFIED",
}

# Config keys that are sizes: the replica sets its own, tests skip them.
SIZE_KEYS = frozenset({
    "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
    "axes_dims_rope", "timestep_guidance_channels", "dim", "n_layers", "n_refiner_layers", "n_heads",
    "n_kv_heads", "cap_feat_dim", "axes_dims", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_key_value_heads", "head_dim", "vocab_size", "layer_types", "max_window_layers", "block_out_channels",
    "layers_per_block", "norm_num_groups", "projection_dim", "projection_size", "embed_dim", "width", "layers",
    "heads", "head_width", "mlp_ratio", "encoder_width", "depth", "num_heads",
})

_FLUX2_FILES = (
    "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
    "text_encoder/generation_config.json", "text_encoder/model.safetensors.index.json",
    "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors",
    "tokenizer/added_tokens.json", "tokenizer/chat_template.jinja", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
)

_QWEN3_4B = {  # text_encoder/config.json, non-size values
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960, "attention_bias": False, "tie_word_embeddings": True,
}

_FLUX2_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
    "mlp_ratio": 3.0, "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}

_FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2", "in_channels": 3, "out_channels": 3, "latent_channels": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "act_fn": "silu",
    "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
    "batch_norm_eps": 1e-4, "batch_norm_momentum": 0.1, "patch_size": [2, 2],
}

_FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _flux2(distilled: bool) -> dict:
    return {
        "files": _FLUX2_FILES,
        "configs": {
            "model_index.json": {
                "_class_name": "Flux2KleinPipeline", "is_distilled": distilled,
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                "transformer": ["diffusers", "Flux2Transformer2DModel"],
                "vae": ["diffusers", "AutoencoderKLFlux2"],
            },
            "transformer/config.json": _FLUX2_TRANSFORMER,
            "text_encoder/config.json": _QWEN3_4B,
            "vae/config.json": _FLUX2_VAE,
            "scheduler/scheduler_config.json": _FLUX_SCHEDULER,
        },
        "sources": ("flux2.layout", "flux2.transformer", "flux2.model_index", "flux2.vae", "flux2.scheduler",
                    "qwen3_4b"),
    }


def _zimage(transformer_shards: int, shift: float) -> dict:
    shards = [f"transformer/diffusion_pytorch_model-{i:05d}-of-{transformer_shards:05d}.safetensors"
              for i in range(1, transformer_shards + 1)]
    return {
        "files": (
            "model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json", *shards, "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json", *(f"text_encoder/model-{i:05d}-of-00003.safetensors"
                                                           for i in (1, 2, 3)),
            "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
            "tokenizer/merges.txt", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        ),
        "configs": {
            "model_index.json": {
                "_class_name": "ZImagePipeline",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            },
            "transformer/config.json": {
                "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
                "in_channels": 16, "qk_norm": True, "norm_eps": 1e-5, "rope_theta": 256.0, "t_scale": 1000.0,
                "axes_lens": [1024, 512, 512],
            },
            "text_encoder/config.json": _QWEN3_4B,
            "vae/config.json": {
                "_class_name": "AutoencoderKL", "latent_channels": 16, "scaling_factor": 0.3611,
                "shift_factor": 0.1159, "sample_size": 1024, "force_upcast": True,
            },
            "scheduler/scheduler_config.json": {
                "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "use_dynamic_shifting": False, "shift": shift,
            },
        },
        "sources": ("zimage.layout", "zimage.transformer", "zimage.scheduler", "zimage.vae", "qwen3_4b"),
    }


_HIDREAM_O1_SHARDS = 4
_HIDREAM_O1 = {
    "shards": _HIDREAM_O1_SHARDS,
    "files": ("config.json", "model.safetensors.index.json",
              *(f"model-{i:05d}-of-{_HIDREAM_O1_SHARDS:05d}.safetensors" for i in range(1, _HIDREAM_O1_SHARDS + 1)),
              "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"),
    "configs": {
        "config.json": {"model_type": "qwen3_vl", "architectures": ["Qwen3VLForConditionalGeneration"],
                        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                        "vision_end_token_id": 151653},
        "config.json:text_config": {"model_type": "qwen3_vl_text", "vocab_size": 151936, "rope_theta": 5000000,
                                    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False},
        "config.json:vision_config": {"model_type": "qwen3_vl", "patch_size": 16, "spatial_merge_size": 2,
                                      "temporal_patch_size": 2, "in_channels": 3, "hidden_act": "gelu_pytorch_tanh"},
        "preprocessor_config.json": {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
                                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                                     "size": {"longest_edge": 16777216, "shortest_edge": 65536}},
    },
    "sources": ("hidream_o1.layout", "hidream_o1.config", "hidream_o1.processor"),
}
_SIGLIP_TOKENIZER_FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json")
_OPENAI_MEAN, _OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

PUBLISHED: dict[str, dict] = {
    "FLUX.2-klein-base-4B": _flux2(distilled=False),
    "FLUX.2-klein-4B": _flux2(distilled=True),
    "Z-Image": _zimage(transformer_shards=2, shift=6.0),
    "Z-Image-Turbo": _zimage(transformer_shards=3, shift=3.0),
    "HiDream-O1-Image": _HIDREAM_O1,
    "siglip2-so400m-patch16-512": {
        "files": ("config.json", "model.safetensors", "preprocessor_config.json", *_SIGLIP_TOKENIZER_FILES),
        "configs": {
            "config.json": {"model_type": "siglip", "initializer_factor": 1.0},
            "config.json:vision_config": {"model_type": "siglip_vision_model", "image_size": 512, "patch_size": 16},
            "config.json:text_config": {"model_type": "siglip_text_model"},
            "preprocessor_config.json": {
                "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
                "do_resize": True, "do_rescale": True, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 255,
                "size": {"height": 512, "width": 512},
            },
        },
        "sources": ("siglip2.fixres",),
    },
    "siglip2-so400m-patch16-naflex": {
        "files": ("config.json", "model.safetensors", "preprocessor_config.json", *_SIGLIP_TOKENIZER_FILES),
        "configs": {
            "config.json": {"model_type": "siglip2"},
            "config.json:vision_config": {"model_type": "siglip2_vision_model", "patch_size": 16,
                                          "num_patches": 256},
            "config.json:text_config": {"model_type": "siglip2_text_model"},
            "preprocessor_config.json": {
                "image_processor_type": "Siglip2ImageProcessorFast", "processor_class": "Siglip2Processor",
                "max_num_patches": 256, "patch_size": 16, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
            },
        },
        "sources": ("siglip2.naflex",),
    },
    "CLIP-ViT-H-14-laion2B-s32B-b79K": {
        "files": ("open_clip_config.json", "open_clip_model.safetensors", "config.json", "model.safetensors",
                  "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
                  "tokenizer_config.json", "vocab.json", "merges.txt"),
        "configs": {
            "open_clip_config.json:model_cfg:vision_cfg": {"image_size": 224, "patch_size": 14},
            "open_clip_config.json:model_cfg:text_cfg": {"context_length": 77, "vocab_size": 49408},
            "preprocessor_config.json": {"image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD,
                                         "crop_size": {"height": 224, "width": 224}},
        },
        "sources": ("open_clip", "laion_vit_h_14.hf"),
    },
    "PickScore_v1": {
        "files": ("config.json", "model.safetensors"),
        "configs": {"config.json": {"model_type": "clip", "architectures": ["CLIPModel"]}},
        "sources": ("pickscore",),
    },
    "laion-aesthetic": {
        "files": ("sac+logos+ava1-l14-linearMSE.pth", "clip-vit-large-patch14/open_clip_config.json",
                  "clip-vit-large-patch14/open_clip_model.safetensors"),
        "configs": {
            "clip-vit-large-patch14/open_clip_config.json:model_cfg": {"quick_gelu": True},
            "clip-vit-large-patch14/open_clip_config.json:model_cfg:vision_cfg": {"image_size": 224,
                                                                                 "patch_size": 14},
        },
        "sources": ("aesthetic", "open_clip"),
    },
    "DiffSynth-Studio-ImageMetrics": {
        "files": ("Aesthetic/model.safetensors", "Aesthetic/preprocessor_config.json",
                  "PickScore/model.safetensors", "PickScore/config.json", "PickScore/preprocessor_config.json",
                  "PickScore/tokenizer.json", "PickScore/tokenizer_config.json", "PickScore/vocab.json",
                  "PickScore/merges.txt",
                  "ImageReward/model.safetensors", "ImageReward/med_config.json", "ImageReward/tokenizer.json",
                  "ImageReward/tokenizer_config.json", "ImageReward/vocab.txt",
                  "HPSv2/model.safetensors", "HPSv2/preprocessor_config.json", "HPSv2/tokenizer.json",
                  "HPSv2/vocab.json", "HPSv2/merges.txt",
                  "HPSv3/model.safetensors", "HPSv3/preprocessor_config.json", "HPSv3/tokenizer.json",
                  "HPSv3/tokenizer_config.json", "HPSv3/vocab.json", "HPSv3/merges.txt"),
        "configs": {
            "ImageReward/med_config.json": {
                "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu", "layer_norm_eps": 1e-12,
                "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0, "add_cross_attention": True,
                "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "encoder_width": 1024,
                "hidden_size": 768, "vocab_size": 30524,
            },
            "Aesthetic/preprocessor_config.json": {"image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD,
                                                   "crop_size": {"height": 224, "width": 224}},
            "HPSv2/preprocessor_config.json": {"image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD},
            "HPSv3/preprocessor_config.json": {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2},
            "HPSv3/config.json": {"model_type": "qwen2_vl", "tie_word_embeddings": False},
            "HPSv3/config.json:vision_config": {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                                                "in_channels": 3},
        },
        "sources": ("diffsynth.image_metrics", "imagereward", "hpsv3", "hpsv2", "pickscore", "aesthetic"),
    },
    "HPSv2.1": {
        "files": ("HPS_v2.1_compressed.pt",),
        "configs": {},
        "sources": ("hpsv2", "open_clip"),
    },
}
