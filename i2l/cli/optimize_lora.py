"""Optimise a per-style LoRA directly on one style's reference images: the baseline i2L amortizes.

Same targets, rank and file format as predicted LoRAs; prompts are the references' contents. Give the style
either as --style-id from a prepared data dir, or as --images with matching --prompts.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", default=None, help="prepared data dir (with --style-id)")
    p.add_argument("--style-id", default=None, help="style id, e.g. s000105 (uses all its rows in --data)")
    p.add_argument("--images", nargs="*", default=None, help="reference images (instead of --style-id)")
    p.add_argument("--prompts", nargs="*", default=None, help="one content prompt per --images entry")
    p.add_argument("--steps", type=int, default=100, help="optimisation steps")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: eval.lora_lr)")
    p.add_argument("--out", required=True, help="output .safetensors file")


def main(args):
    import time

    from i2l.backbones import load_backbone
    from i2l.baselines.per_style import optimize_lora
    from i2l.data.images import load_image_file, to_tensor
    from i2l.train.step import timestep_sampler

    cfg = config_from_args(args)
    if args.style_id:
        if not args.data:
            raise ValueError("--style-id needs --data")
        from i2l.data.images import decode
        from i2l.data.shards import iter_rows

        rows = [r for split in ("val", "train") for r in _rows(iter_rows, args.data, split)
                if r["style_id"] == args.style_id]
        if not rows:
            raise ValueError(f"style {args.style_id} not found in {args.data}")
        images, prompts = [decode(r["image"]) for r in rows], [r["content"] for r in rows]
    else:
        if not args.images or not args.prompts or len(args.images) != len(args.prompts):
            raise ValueError("give --style-id, or --images with the same number of --prompts")
        images, prompts = [load_image_file(p) for p in args.images], list(args.prompts)
    backbone = load_backbone(cfg)
    t0 = time.perf_counter()
    lora, _ = optimize_lora(backbone, to_tensor(images, cfg.backbone.image_size), prompts, cfg.predictor.rank,
                            args.steps, lr=cfg.eval.lora_lr if args.lr is None else args.lr, seed=cfg.train.seed,
                            timesteps=timestep_sampler(cfg, backbone))  # t drawn by the preset's train.timesteps
    secs = time.perf_counter() - t0
    lora.meta.update({"wall_s": secs, "n_images": len(images)})
    path = lora.save(args.out, prefix=backbone.lora_prefix)
    print(f"per-style LoRA: {args.steps} steps on {len(images)} images in {secs:.1f}s -> {path}")
    return 0


def _rows(iter_rows, data, split):
    try:
        yield from iter_rows(data, split, columns=("id", "image", "content"))
    except FileNotFoundError:
        return
