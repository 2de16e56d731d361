"""Predict one style LoRA from 1..N reference images in a single forward pass.

The references are fused by token concatenation (paper §4.5). Writes a safetensors file in the key layout of the
program that will read it (`--format`: diffusers, diffsynth or comfyui; docs/cli.md).
"""

from i2l.config.sections import LORA_FORMATS

FORMAT_HELP = ("LoRA file key layout, for the program that reads it: diffusers (default; "
               "`transformer.<module>.lora_A.weight`, diffusers' load_lora_weights), diffsynth (no prefix, the "
               "module names of DiffSynth-Studio's DiT classes: its GeneralLoRALoader patches every layer), comfyui "
               "(`diffusion_model.<module>`, ComfyUI's model names: BFL's for FLUX.2, q/k/v fused into qkv). "
               "i2l reads all three back")


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--images", nargs="+", required=True, help="reference image paths or globs")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--strength", type=float, default=1.0, help="scale the LoRA (ΔW -> s·ΔW)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", default="diffusers", choices=LORA_FORMATS, help=FORMAT_HELP)


def main(args):
    from i2l.backbones.registry import lora_naming
    from i2l.infer.api import I2L
    from i2l.infer.generation import check_image_paths, check_output
    from i2l.model.finite import MAX_ABS_WEIGHT, require_finite
    from i2l.train.checkpoint import resolve_checkpoint

    require_finite(args.strength, "--strength")  # argparse's float() takes "nan" and "inf"
    # every path is checked before the model loads (seconds to minutes): a typo fails at once
    images = check_image_paths(args.images)
    check_output(args.out, directory=False)
    ck = resolve_checkpoint(args.checkpoint)  # verified; a broken newest step falls back to an older one, warned
    # predicting needs the encoder and predictor only: a real backbone (GBs) is not loaded
    model = I2L.load(ck, device=args.device, backbone=False)
    lora = model.predict_lora(images)
    if args.strength != 1.0:
        lora = lora.scaled(args.strength)
        # never write a file that LoRA.load would refuse
        lora.check_finite(f"LoRA at --strength {args.strength:g}", bound=MAX_ABS_WEIGHT)
    # the layer names each program uses are the backbone kind's (neither its weights nor its class loaded)
    path = lora.save(args.out, format=args.format, backbone=lora_naming(model.cfg.backbone.kind))
    print(f"LoRA from {len(images)} reference(s): rank {lora.rank}, {len(lora.names)} layers -> {path} "
          f"({args.format} format)")
    return 0
