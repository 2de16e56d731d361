"""Prepare a MegaStyle directory (real or toy) into training-ready, style-disjoint train/val shards.

Reads the published parquet shards (id, image{bytes,path}, content, style), validates and decodes every image
(rejects go to quarantine.parquet with a reason), upscales to the preset's resolution on Ray, and writes
<out>/{train,val}/part-XXXXX.parquet, val_manifest.jsonl (1 prompt + 4 references per held-out sample) and
manifest.json. Re-running resumes: finished shards are kept, nothing is duplicated or lost.
"""

from pathlib import Path

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--input", default=None, help="MegaStyle-layout directory (default: <data-root>/toyworld/<preset>)")
    p.add_argument("--out", default=None, help="output directory (default: <data-root>/prepared/<preset>)")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default=None,
                   help="image encoding of the shards (default: the preset's data.image_format)")
    p.add_argument("--upscaler", default=None,
                   help="'lanczos' (CPU) or a local diffusers upscale pipeline directory (GPU actors)")
    p.add_argument("--workers", type=int, default=None, help="Ray workers (default: data.concurrency)")
    p.add_argument("--force", action="store_true",
                   help="delete an --out prepared from other inputs or another data config, then rebuild")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args):
    from i2l.data.prepare import prepare

    cfg = config_from_args(args)
    for flag, name in (("format", "image_format"), ("upscaler", "upscaler"), ("workers", "concurrency")):
        if getattr(args, flag) is not None:
            setattr(cfg.data, name, getattr(args, flag))
    cfg.data.__post_init__()
    from i2l.layout import paths_for

    input_dir = Path(args.input) if args.input else paths_for(cfg).toyworld_dir
    out = Path(args.out) if args.out else paths_for(cfg).prepared_dir
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory {input_dir} not found: pass --input DIR (a MegaStyle "
                                "directory) or write the toy world first with `i2l toyworld`")
    summary = prepare(cfg, input_dir, out, progress=not args.no_progress, force=args.force)
    print(summary.format())
    return 0
