"""Generate images with style LoRAs and asymmetric LoRA guidance (paper §3.4), many styles in one batched forward.

Positive branch: the style's LoRA + the prompt; negative branch: the gray-image LoRA + the negative (empty) prompt;
both branches of every sample in a batch run as one forward per step. --plain-cfg puts the style's LoRA on both.
Styles: --lora FILE (repeatable) and/or --images IMG ... (repeatable; each group of references, paths or globs, is
fused into one LoRA by token concatenation); --mix W,W,... mixes all given styles into one in LoRA space.
--inpaint IMAGE --mask MASK regenerates the mask's white region and keeps the rest (composition).
--init-image IMG --denoise D (img2img): start from IMG noised to where a fraction D of the steps remains.
--negative gray|base|none: the negative branch is the gray-image LoRA (the paper), the base model, or absent (no CFG).
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
    p.add_argument("--init-image", action="append", default=[], metavar="IMG",
                   help="img2img: start from this image (one for all prompts, or repeat once per --prompt); resized "
                        "to the model's image size")
    p.add_argument("--denoise", type=float, default=None, metavar="D",
                   help="img2img: fraction of the steps sampled from the noised init image, in [0, 1] (1 = from pure "
                        "noise, 0 = the init image back; default 0.6)")
    p.add_argument("--negative", choices=("gray", "base", "none"), default="gray",
                   help="CFG negative branch: gray-image LoRA (paper, default), base model (no LoRA), none (no CFG)")
    p.add_argument("--cfg-passes", choices=("auto", "joint", "split"), default="auto",
                   help="how the two CFG branches run per step: one batched forward of 2B rows (joint), two of B rows "
                        "(split), or the one measured faster on --device (auto, default); the images are the same")
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
    if args.denoise is not None:
        args.denoise = require_finite(args.denoise, "--denoise")
        if not 0.0 <= args.denoise <= 1.0:
            raise ValueError(f"--denoise must be in [0, 1] (1 = from pure noise, 0 = the init image back), "
                             f"got {args.denoise:g}")
        if not args.init_image:
            raise ValueError("--denoise needs --init-image (img2img)")
    if args.init_image:
        if args.inpaint:
            raise ValueError("--init-image (img2img) and --inpaint together are not supported: use one of them")
        if len(args.init_image) not in (1, len(args.prompt)):
            raise ValueError(f"{len(args.init_image)} --init-image for {len(args.prompt)} --prompt: give one for "
                             "all prompts or one per prompt")
    if args.plain_cfg and args.negative != "gray":
        raise ValueError(f"--plain-cfg and --negative {args.negative} both choose the negative branch: give one")
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
    named = [(args.inpaint, "--inpaint image"), (args.mask, "--mask image")]
    named += [(image, "--init-image") for image in args.init_image]
    for image, what in named:
        if image:
            check_image_file(image, what)
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
    from i2l.infer.guidance import DEFAULT_DENOISE
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
        negative_prompt=args.negative_prompt, batch_size=args.batch_size, negative=args.negative,
        passes=args.cfg_passes,
        denoise=1.0 if not args.init_image else DEFAULT_DENOISE if args.denoise is None else args.denoise)
    inpaint = None
    if args.inpaint:
        inpaint = load_inpaint(model.backbone, args.inpaint, args.mask, model.cfg.backbone.image_size)
    rows = generate_samples(model, styles, args.prompt, args.out, settings,
                            seeds=list(range(args.seed, args.seed + args.samples)), inpaint=inpaint,
                            progress=not args.no_progress, init_images=args.init_image)
    cfg = settings.cfg_kind(model.backbone)
    how = "no CFG" if cfg == "none" else f"{cfg} CFG {settings.guidance:g}"
    img2img = f", img2img denoise {settings.denoise:g}" if args.init_image else ""
    print(f"{len(rows)} image(s) of {len(styles)} style(s) x {len(args.prompt)} prompt(s) -> {args.out} "
          f"({how}, {settings.steps} steps{img2img})")
    return 0
