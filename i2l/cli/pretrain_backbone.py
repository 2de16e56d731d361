"""Pretrain the toy backbone (tiny Flux2Transformer2DModel + toy text encoder) on the toy world.

Text-conditioned flow matching over all training styles: with a content prompt and no LoRA it draws the
prompted content in a generic style; train.backbone_styled (0.5 in the toy preset) is the share of prompts that
also name the style's look, so that it learns style words as a text-to-image model does. Writes a diffusers `save_pretrained` layout (transformer/ loads with
Flux2Transformer2DModel.from_pretrained). Toy presets only: real backbones are loaded from local directories.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data dir (train split) or a raw toy world dir")
    p.add_argument("--out", default=None, help="output dir (default: <data-root>/toy/<preset>/backbone)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.backbone_steps)")


def main(args):
    from i2l.toy.backbone_pretrain import pretrain_backbone
    from i2l.train.run_key import forget_run_key

    cfg = config_from_args(args)
    forget_run_key(args.out or cfg.backbone.path)  # a hand-made backbone is no flow stage's output
    info = pretrain_backbone(cfg, args.data, args.out or cfg.backbone.path, steps=args.steps)
    print(f"toy backbone: loss {info['first_loss']:.4f} -> {info['last_loss']:.4f} in {info['steps']} steps "
          f"({info['seconds']:.0f}s) -> {info['dir']}")
    return 0
