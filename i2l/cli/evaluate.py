"""Evaluate a trained predictor on held-out styles against the baselines (the toy world's Table 1).

Methods: base (no LoRA), mean-LoRA (one LoRA trained on all training styles), per-style LoRAs optimised for
eval.optimize_budgets steps (with wall time), i2L with 1 and 4 references with plain and asymmetric CFG, and
the adapter baseline (encoder tokens as extra context tokens). mean-LoRA and the adapter are trained here with
the predictor's step budget unless already trained. One image per sample and method (same prompt and seed),
scored (CLIP-Text, CLIP-Style, style similarity, leakage; plugins, or skipped with the reason), plus the
held-out FM loss, all recorded in the results store. Re-running with the same inputs does nothing.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--checkpoint", required=True, help="training run dir or one checkpoint dir")
    p.add_argument("--data", required=True, help="prepared data dir (val split + val_manifest.jsonl)")
    p.add_argument("--store", default=None, help="results store (default: <data-root>/results.duckdb)")
    p.add_argument("--out", default=None, help="where images and LoRAs go (default: CHECKPOINT/eval)")
    p.add_argument("--styles", type=int, default=None, help="held-out samples (default: eval.styles)")
    p.add_argument("--methods", default=None,
                   help="method families, comma-separated (default: base,mean_lora,per_style,i2l,adapter)")
    p.add_argument("--parent-run", default=None, help="pipeline run id this evaluation belongs to")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def main(args):
    from i2l.eval.stage import FAMILIES, evaluate
    from i2l.store import Store, store_path
    from i2l.train.checkpoint import resolve_checkpoint

    cfg = config_from_args(args)
    resolve_checkpoint(args.checkpoint)  # verified before anything starts; a broken newest step is warned about once
    if args.styles:
        cfg.eval.styles = args.styles
    families = tuple(m for m in args.methods.split(",") if m) if args.methods else FAMILIES
    store = Store(args.store or store_path(cfg))
    info = evaluate(cfg, args.data, args.checkpoint, store, out_dir=args.out, parent_id=args.parent_run,
                    families=families, device=args.device)
    print(f"eval run {info['run_id']}: {info.get('images', 0)} images under {info.get('out_dir')}")
    return 0
