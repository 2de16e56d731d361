"""Train the adapter baseline: the frozen encoder's patch tokens -> extra context tokens for the backbone.

Trained by flow matching through the frozen backbone on the same training tuples, with the same step budget
and batch size as the i2L predictor (train.steps x train.batch_size; eval.baseline_steps overrides the steps).
Writes OUT/adapter.safetensors + adapter.json (config, loss curve). `i2l evaluate` trains it when needed.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data dir (train split)")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the predictor's budget)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def main(args):
    from i2l.baselines.adapter import train_adapter

    info = train_adapter(config_from_args(args), args.data, args.out, steps=args.steps, device=args.device)
    print(f"adapter: loss {info['first_loss']:.4f} -> {info['last_loss']:.4f} in {info['steps']} steps "
          f"({info['seconds']:.0f}s) -> {info['dir']}")
    return 0
