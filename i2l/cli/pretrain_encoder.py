"""Pretrain the toy image encoder (a tiny SiglipVisionModel) on toy images <-> style descriptions.

SigLIP's sigmoid loss, all images of a style count as positives, so the patch tokens that i2L reads carry
style. The encoder is frozen afterwards, as the paper's SigLIP2 is. Toy presets only.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data dir (train split) or a raw toy world dir")
    p.add_argument("--out", default=None, help="output dir (default: <data-root>/toy/<preset>/encoder)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: encoder.pretrain_steps; 0 writes the frozen random encoder, "
                        "the ablation baseline)")


def main(args):
    from i2l.toy.encoder_pretrain import pretrain_encoder
    from i2l.train.run_key import forget_run_key

    cfg = config_from_args(args)
    forget_run_key(args.out or cfg.encoder.path)  # a hand-made encoder is no flow stage's output
    info = pretrain_encoder(cfg, args.data, args.out or cfg.encoder.path, steps=args.steps)
    if info["steps"]:
        print(f"toy encoder: loss {info['first_loss']:.4f} -> {info['last_loss']:.4f} ({info['seconds']:.0f}s) "
              f"-> {info['dir']}")
    else:
        print(f"toy encoder: random initialisation (0 steps) -> {info['dir']}")
    return 0
