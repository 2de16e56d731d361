"""How each backbone kind's LoRA files name its layers: the key prefix of its diffusers files and, per other file
format (i2l.model.lora_formats), a renaming table. Plain data, read by kind through the registry: writing a LoRA
file (mass production's actors, `i2l predict`) then imports no diffusers: a produce actor on the debug checkpoint
started in 3.8-3.9 s instead of 4.7-4.8 (2-core CPU; the encoder's transformers import, torch._dynamo with it, stays).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from i2l.model.lora_formats import NameTable

# ComfyUI's FLUX.2 model keeps BFL's checkpoint names, so its LoRA keys are `diffusion_model.<BFL name>` (comfy/lora.py
# maps every `diffusion_model.<key>` of the model onto itself). The BFL <-> diffusers names are diffusers' own
# (`_convert_non_diffusers_flux2_lora_to_diffusers`, which tests/interop reads the comfyui files back with): q, k, v
# are one fused qkv there, in that order. DiffSynth's Flux2DiT uses diffusers' names (tests/interop checks them).
FLUX2_BFL_NAMES = (
    (r"transformer_blocks\.(\d+)\.attn\.to_q", r"double_blocks.\1.img_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", r"double_blocks.\1.img_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", r"double_blocks.\1.img_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", r"double_blocks.\1.txt_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", r"double_blocks.\1.txt_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", r"double_blocks.\1.txt_attn.qkv"),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", r"double_blocks.\1.img_attn.proj"),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", r"double_blocks.\1.txt_attn.proj"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", r"double_blocks.\1.img_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", r"double_blocks.\1.img_mlp.2"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", r"double_blocks.\1.txt_mlp.0"),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", r"double_blocks.\1.txt_mlp.2"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", r"single_blocks.\1.linear1"),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", r"single_blocks.\1.linear2"),
)


@dataclass(frozen=True)
class LoRANaming:
    """A backbone kind's LoRA file names; what `LoRA.save(..., backbone=...)` reads (as it reads a Backbone's)."""

    lora_prefix: str = "transformer"  # key prefix of its diffusers LoRA files: the pipeline component
    # format -> (regex on the diffusers module name, that program's name as a `re` template) pairs; modules several
    # pairs send to one name are one fused layer there, in pair order. A format not listed keeps diffusers' names.
    file_names: Mapping[str, NameTable] = field(default_factory=dict)

    def lora_names(self, format: str) -> tuple[tuple[str, str], ...]:
        """The renaming table `LoRA.save(..., format=format)` writes this backbone's layers with."""
        from i2l.model.lora_formats import check_format  # torch: only where a file is written

        return tuple(self.file_names.get(check_format(format), ()))
