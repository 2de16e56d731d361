"""Generate images with style LoRAs and asymmetric LoRA guidance (paper §3.4), many styles in one batched forward.

Positive branch: the style's LoRA + the prompt; negative branch: the gray-image LoRA + the negative (empty) prompt;
both branches of every sample in a batch run as one forward per step. --plain-cfg puts the style's LoRA on both.
Styles: --lora FILE (repeatable) and/or --images IMG ... (repeatable; each group of references, paths or globs, is
fused into one LoRA by token concatenation); --mix W,W,... mixes all given styles into one in LoRA space.
--inpaint IMAGE --mask MASK regenerates the mask's white region and keeps the rest (composition).
Writes OUT/<sample_id>.png and OUT/samples.csv (sample id, prompt, lora id, seed, settings).
"""


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--lora", action="append", default=[], metavar="FILE", help="a LoRA file (repeatable)")
    p.add_argument("--images", action="append", nargs="+", default=[], metavar="IMG",
                   help="reference images or globs fused into one style (repeat the flag for more styles)")
    p.add_argument("--mix", default=None, metavar="W,W,...",
                   help="mix all styles into one with these weights (order: --lora files, then --images groups)")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    p.add_argument("--negative-prompt", default="", help="prompt of the negative branch (default: empty)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--plain-cfg", action="store_true", help="plain CFG: the style LoRA on both branches")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: eval.guidance of the checkpoint)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: eval.sample_steps)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--samples", type=int, default=1, help="images per style and prompt (seeds seed, seed+1, ...)")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (0 = base model)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per batched sampling call")
    p.add_argument("--inpaint", default=None, metavar="IMAGE", help="image to inpaint (needs --mask)")
    p.add_argument("--mask", default=None, metavar="MASK", help="mask image: white = regenerate, black = keep")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def _check_before_load(args) -> tuple[list[list[str]], list[float] | None]:
    """Every flag and path, before the model loads (seconds to minutes): the reference groups (globs expanded) and
    the --mix weights."""
    from i2l.data.images import check_image_file
    from i2l.infer.generation import check_image_paths, check_lora_file, check_output
    from i2l.model.finite import require_finite

    for flag, value in (("--guidance", args.guidance), ("--strength", args.strength)):
        if value is not None:
            require_finite(value, flag)  # argparse's float() takes "nan" and "inf"
    if not args.lora and not args.images:
        raise ValueError("no style given: pass --lora FILE and/or --images IMG [IMG ...]")
    if bool(args.inpaint) != bool(args.mask):
        raise ValueError("--inpaint and --mask go together")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    weights = None
    if args.mix:
        try:
            weights = [float(w) for w in args.mix.split(",")]
        except ValueError:
            raise ValueError(f"--mix takes comma-separated numbers, got {args.mix!r}") from None
        weights = [require_finite(w, f"--mix weight {i + 1}") for i, w in enumerate(weights)]
    for f in args.lora:
        check_lora_file(f)
    groups = [check_image_paths(group) for group in args.images]
    for image in filter(None, (args.inpaint, args.mask)):
        check_image_file(image)
    check_output(args.out, directory=True)
    return groups, weights


def main(args):
    from i2l.infer.api import I2L
    from i2l.infer.generation import (
        GenerateSettings,
        generate_samples,
        load_inpaint,
        mix_styles,
        style_from_file,
        style_from_images,
    )
    from i2l.train.checkpoint import resolve_checkpoint

    groups, weights = _check_before_load(args)
    ck = resolve_checkpoint(args.checkpoint)  # verified; a broken newest step falls back to an older one, warned
    model = I2L.load(ck, device=args.device)
    styles = [style_from_file(f, model.backbone) for f in args.lora]
    styles += [style_from_images(model, group) for group in groups]
    if weights is not None:
        styles = [mix_styles(styles, weights)]
    settings = GenerateSettings(
        guidance=model.cfg.eval.guidance if args.guidance is None else args.guidance,
        steps=args.steps or model.cfg.eval.sample_steps, strength=args.strength, asymmetric=not args.plain_cfg,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size)
    inpaint = None
    if args.inpaint:
        inpaint = load_inpaint(model.backbone, args.inpaint, args.mask, model.cfg.backbone.image_size)
    rows = generate_samples(model, styles, args.prompt, args.out, settings,
                            seeds=list(range(args.seed, args.seed + args.samples)), inpaint=inpaint,
                            progress=not args.no_progress)
    print(f"{len(rows)} image(s) of {len(styles)} style(s) x {len(args.prompt)} prompt(s) -> {args.out} "
          f"({'asymmetric' if settings.asymmetric else 'plain'} CFG {settings.guidance:g}, {settings.steps} steps)")
    return 0
