"""Held-out flow-matching loss of backbone + LoRA on unseen styles, on a fixed noise/timestep grid.

Methods: base (no LoRA), gray-image LoRA, i2L with 1 and with 4 references, a wrong-style i2L LoRA (sanity),
and per-style LoRAs optimised at several step budgets (eval.optimize_budgets, eval.per_style_rows rows per
step) with the wall time of one style, so the table shows where one i2L forward falls on the per-style
optimisation curve. As for `i2l evaluate`, the model comes from the checkpoint and the `eval` settings and
data root from --preset / --set / --data-root, so both give the same held-out losses for the same settings.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--data", required=True, help="prepared data dir (val split + val_manifest.jsonl)")
    p.add_argument("--styles", type=int, default=None, help="held-out styles to evaluate (default: eval.styles)")
    p.add_argument("--budgets", default=None, help="per-style step budgets, e.g. 5,25,100 (empty: none)")
    p.add_argument("--store", default=None, help="results store to record into (default: <data-root>/results.duckdb)")
    p.add_argument("--no-store", action="store_true", help="do not record the results")


def main(args):
    from i2l.eval.heldout_loss import format_table, summarize
    from i2l.eval.methods import (
        base_conditioning,
        heldout_losses,
        i2l_conditionings,
        i2l_ref_counts,
        per_style_conditionings,
    )
    from i2l.eval.stage import eval_config, held_out_samples
    from i2l.infer.api import I2L
    from i2l.train.checkpoint import require_checkpoint

    cfg = config_from_args(args)  # an unknown preset or field is refused here, before anything loads
    ck = require_checkpoint(args.checkpoint)
    ecfg = eval_config(cfg, ck)
    model = I2L.load(ck, data_root=ecfg.data_root)
    e = model.cfg.eval = ecfg.eval  # heldout_losses reads its grid (fm_timesteps, fm_noise_seeds) from here
    budgets = e.optimize_budgets if args.budgets is None else \
        tuple(int(b) for b in args.budgets.split(",") if b)
    samples = held_out_samples(args.data, args.styles or e.styles)
    # as i2l.eval.stage.make_conditionings: per-style seeded by eval.seed, i2L's reference counts by one rule
    conds = [base_conditioning(len(samples)),
             *per_style_conditionings(model.backbone, samples, budgets, ecfg.predictor.rank,
                                      ecfg.backbone.image_size, e.lora_lr, e.per_style_rows, seed=e.seed,
                                      progress=True),
             *(c for c in i2l_conditionings(model, samples, i2l_ref_counts(samples)) if not c.asym)]
    rows = heldout_losses(model, samples, conds, progress=True)
    print(format_table(summarize(rows)))
    if not args.no_store:
        from i2l.store import Store, store_path

        store = Store(args.store or store_path(ecfg))
        with store.run("eval_loss", ecfg.name, ecfg.to_dict()) as run_id:
            store.record_eval_loss(run_id, rows)
        print(f"recorded in {store.path} as run {run_id}")
    return 0
