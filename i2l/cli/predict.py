"""Predict one style LoRA from 1..N reference images in a single forward pass.

The references are fused by token concatenation (paper §4.5). Writes a diffusers/PEFT-format safetensors file
(`transformer.<module>.lora_A.weight` / `lora_B.weight`) that `load_lora_weights` accepts.
"""


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--images", nargs="+", required=True, help="reference image paths or globs")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--strength", type=float, default=1.0, help="scale the LoRA (ΔW -> s·ΔW)")
    p.add_argument("--device", default="cpu")


def main(args):
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
    path = lora.save(args.out, prefix=model.lora_prefix)
    print(f"LoRA from {len(images)} reference(s): rank {lora.rank}, {len(lora.names)} layers -> {path}")
    return 0
