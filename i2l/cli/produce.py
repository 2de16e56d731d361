"""Mass-produce style LoRAs with a Ray actor pool: one file per style (in `--format`), plus the gray-image LoRA.

Styles come from a validation manifest (`--manifest`, each style's references read from the val shards beside it) or
from a folder of user images (`--images DIR`: each subfolder is one style, each loose image a style of its own).
Actors load the predictor once (GPU actors with --num-gpus on a cluster: set RAY_ADDRESS). Writes
OUT/styles/<style>.safetensors, OUT/gray.safetensors, OUT/catalog.parquet, and the catalog rows to the results
store's `loras` table. Re-running skips what exists; a batch whose actor died is retried. A folder holds one format:
a re-run with another --format on the same --out is refused (choose another --out).
"""

from i2l.cli import add_preset_args, config_from_args
from i2l.cli.predict import FORMAT_HELP
from i2l.config.sections import LORA_FORMATS


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="val_manifest.jsonl (or the prepared dir holding it)")
    src.add_argument("--images", help="folder of user images: subfolders = styles, loose images = one style each")
    p.add_argument("--out", required=True, help="output directory (one per checkpoint)")
    p.add_argument("--limit", type=int, default=None, help="only the first N styles of the manifest")
    p.add_argument("--workers", type=int, default=None, help="actors (default: produce.workers)")
    p.add_argument("--batch-size", type=int, default=None, help="styles per actor call (default: produce.batch_size)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: produce.num_gpus)")
    p.add_argument("--db", default=None, help="results store (default: <data-root>/results.duckdb)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--format", default=None, choices=LORA_FORMATS,
                   help=f"{FORMAT_HELP} (default: produce.format). One format per --out folder")


def main(args):
    from i2l.doctor import require_healthy
    from i2l.produce.jobs import jobs_from_images, jobs_from_manifest
    from i2l.produce.stage import produce
    from i2l.store import Store, store_path
    from i2l.train.checkpoint import checkpoint_config, resolve_checkpoint

    cfg = config_from_args(args)
    ck = resolve_checkpoint(args.checkpoint)  # verified; a broken newest step falls back to an older one, warned
    # the checkpoint's own backbone and encoder, from configs and headers: refuse before any Ray actor starts
    require_healthy(checkpoint_config(ck), purpose="produce")  # as the actors will load it
    pc = cfg.produce
    for flag, name in (("workers", "workers"), ("batch_size", "batch_size"), ("num_gpus", "num_gpus"),
                       ("format", "format")):
        if getattr(args, flag) is not None:
            setattr(pc, name, getattr(args, flag))
    pc.__post_init__()
    jobs = jobs_from_manifest(args.manifest, args.limit) if args.manifest else jobs_from_images(args.images)
    store = Store(args.db or store_path(cfg))
    summary = produce(ck, jobs, args.out, store, workers=pc.workers, batch_size=pc.batch_size,
                      num_gpus=pc.num_gpus, max_retries=pc.max_retries, progress=not args.no_progress,
                      fmt=pc.format)
    print(summary.format())
    return 0
