"""Train the i2L predictor by flow matching through the frozen backbone, on Ray Train.

ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu): one CPU worker by default, N GPU workers
on a cluster (RAY_ADDRESS), DDP (TorchTrainer) when N > 1. Checkpoints (safetensors weights + optimizer
state + config) every train.ckpt_every steps and at the end under OUT/checkpoints/; --resume continues from the
latest. The loss curve and config are kept with the run (OUT/train.json, checkpoint curve.json).
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", required=True, help="prepared data directory (from `i2l prepare`)")
    p.add_argument("--out", required=True, help="run directory for checkpoints")
    p.add_argument("--steps", type=int, default=None, help="total training steps (default: train.steps)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: train.num_workers)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-ray", action="store_true", help="train in this process, without Ray (debugging)")


def main(args):
    import json
    from pathlib import Path

    cfg = config_from_args(args)
    if args.steps:
        cfg.train.steps = args.steps
    if args.workers:
        cfg.train.num_workers = args.workers
    from i2l.doctor import require_healthy

    require_healthy(cfg, purpose="train")  # configs and headers only: refuse a bad checkpoint before Ray starts
    if args.no_ray:
        from i2l.train.loop import train_predictor

        info = train_predictor(cfg, args.data, args.out, resume=args.resume)
    else:
        from i2l.train.launcher import launch_training

        info = launch_training(cfg, args.data, args.out, resume=args.resume)
    Path(args.out, "train.json").write_text(json.dumps({"result": info, "config": cfg.to_dict()}, indent=2,
                                                        default=str))
    print(f"trained predictor -> {args.out} ({json.dumps({k: info[k] for k in info if 'loss' in k})})")
    return 0
