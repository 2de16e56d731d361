"""Held-out flow-matching loss of backbone + LoRA on unseen styles, on a fixed noise/timestep grid.

Methods: base (no LoRA), gray-image LoRA, i2L with 1 and with 4 references, a wrong-style i2L LoRA (sanity),
and per-style LoRAs optimised at several step budgets (eval.optimize_budgets, eval.per_style_rows rows per
step) with the wall time of one style, so the table shows where one i2L forward falls on the per-style
optimisation curve. The same methods and grid as the held-out losses of the evaluate stage (`i2l evaluate`).
"""

from i2l.cli import add_preset_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--data", required=True, help="prepared data dir (val split + val_manifest.jsonl)")
    p.add_argument("--styles", type=int, default=None, help="held-out styles to evaluate (default: eval.styles)")
    p.add_argument("--budgets", default=None, help="per-style step budgets, e.g. 5,25,100 (empty: none)")
    p.add_argument("--store", default=None, help="results store to record into (default: <data-root>/results.duckdb)")
    p.add_argument("--no-store", action="store_true", help="do not record the results")


def main(args):
    from pathlib import Path

    from i2l.api import I2L
    from i2l.eval_methods import base_conditioning, heldout_losses, i2l_conditionings, per_style_conditionings
    from i2l.evaluation import format_table, load_val_samples, summarize

    model = I2L.load(args.checkpoint, data_root=args.data_root)
    cfg = model.cfg
    budgets = cfg.eval.optimize_budgets if args.budgets is None else \
        tuple(int(b) for b in args.budgets.split(",") if b)
    samples = load_val_samples(args.data, limit=args.styles or cfg.eval.styles)
    conds = [base_conditioning(len(samples)), *(c for c in i2l_conditionings(model, samples) if not c.asym),
             *per_style_conditionings(model.backbone, samples, budgets, cfg.predictor.rank, cfg.backbone.image_size,
                                      cfg.eval.lora_lr, cfg.eval.per_style_rows, seed=cfg.train.seed, progress=True)]
    rows = heldout_losses(model, samples, conds, progress=True)
    print(format_table(summarize(rows)))
    if not args.no_store:
        from i2l.store import Store

        store = Store(args.store or Path(cfg.data_root) / "results.duckdb")
        with store.run("eval_loss", cfg.name, cfg.to_dict()) as run_id:
            store.record_eval_loss(run_id, rows)
        print(f"recorded in {store.path} as run {run_id}")
    return 0
