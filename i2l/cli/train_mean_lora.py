"""Train the mean-LoRA baseline: one LoRA (same targets and rank as predicted ones) on all training styles.

Optimised directly by flow matching on the training tuples' targets and prompts (no references), with the
predictor's step budget and batch size (eval.baseline_steps overrides the steps) at eval.mean_lora_lr. Writes
OUT/mean_lora.safetensors (diffusers LoRA format) + mean_lora.json. `i2l evaluate` trains it when needed.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data dir (train split)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the predictor's budget)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def main(args):
    from i2l.baselines.mean_lora import train_mean_lora

    info = train_mean_lora(config_from_args(args), args.data, args.out, steps=args.steps, device=args.device)
    print(f"mean-LoRA: loss {info['first_loss']:.4f} -> {info['last_loss']:.4f} in {info['steps']} steps "
          f"({info['seconds']:.0f}s) -> {info['dir']}")
    return 0
