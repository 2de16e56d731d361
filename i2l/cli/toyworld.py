"""Write the toy world: procedural styles in the exact MegaStyle parquet layout.

Shards `train-XXXXX-of-YYYYY.parquet` with columns id, image{bytes,path}, content, style (8 consecutive
rows per style) and a metadata.csv of style attributes. Deterministic from --seed. Writing over a folder
replaces the toy world there (its other train-*-of-*.parquet shards are removed).
"""

from pathlib import Path

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--out", default=None, help="output directory (default: <data-root>/toyworld/<preset>); "
                   "toy world shards of an earlier write there are removed")
    p.add_argument("--styles", type=int, default=None, help="number of styles (8 images each)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed => same bytes)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels")


def main(args):
    from i2l.toy.world import write_toyworld

    cfg = config_from_args(args)
    tw = cfg.toyworld
    for name in ("styles", "seed", "size"):
        if getattr(args, name) is not None:
            setattr(tw, name, getattr(args, name))
    tw.__post_init__()
    from i2l.layout import paths_for
    from i2l.train.run_key import forget_run_key

    out = Path(args.out) if args.out else paths_for(cfg).toyworld_dir
    # The folder may hold the prepare_data flow's toy world, with the key of its stage: once written over by hand
    # it is not that world any more, so the flow must write it again rather than skip.
    forget_run_key(out)
    summary = write_toyworld(tw, out)
    print(f"toy world: {summary['rows']} images, {summary['styles']} styles, "
          f"{len(summary['shards'])} shards -> {out}")
    return 0
