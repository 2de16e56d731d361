"""Held-out flow-matching loss of backbone + LoRA on unseen styles, on a fixed noise/timestep grid.

Methods: base (no LoRA), gray-image LoRA, i2L with 1 and with 4 references, a wrong-style i2L LoRA (sanity),
and per-style LoRAs optimised at several step budgets (eval.optimize_budgets, eval.per_style_rows rows per
step) with the wall time of one style, so the table shows where one i2L forward falls on the per-style
optimisation curve. A second table splits each method's gain over the base by bands of t (t = 0 noise: layout
and colours; t = 1 the image: fine detail). As for `i2l evaluate`, the model comes from the checkpoint and the
`eval` settings and data root from --preset / --set / --data-root, so both give the same held-out losses for the
same settings.
"""

from i2l.cli import add_preset_args, config_from_args

LOSS_FAMILIES = ("base", "per_style", "i2l")  # the held-out-loss methods; mean-LoRA and the adapter need training


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--checkpoint", required=True, help="training run dir or checkpoint dir")
    p.add_argument("--data", required=True, help="prepared data dir (val split + val_manifest.jsonl)")
    p.add_argument("--styles", type=int, default=None, help="held-out styles to evaluate (default: eval.styles)")
    p.add_argument("--budgets", default=None, help="per-style step budgets, e.g. 5,25,100 (empty: none)")
    p.add_argument("--store", default=None, help="results store to record into (default: <data-root>/results.duckdb)")
    p.add_argument("--no-store", action="store_true", help="do not record the results")


def main(args):
    from dataclasses import replace

    from i2l.eval.heldout_loss import format_loss_table, mean_loss_by_method
    from i2l.eval.identity import eval_config
    from i2l.eval.methods import heldout_losses, make_conditionings
    from i2l.eval.stage import held_out_samples
    from i2l.infer.api import I2L
    from i2l.store.noise_levels import format_gains_by_noise_level, gains_by_noise_level
    from i2l.train.checkpoint import require_checkpoint

    cfg = config_from_args(args)  # an unknown preset or field is refused here, before anything loads
    ck = require_checkpoint(args.checkpoint)
    ecfg = eval_config(cfg, ck)
    ev = ecfg.eval
    if args.budgets is not None:
        ev = replace(ev, optimize_budgets=tuple(int(b) for b in args.budgets.split(",") if b))
    model = I2L.load(ck, data_root=ecfg.data_root)
    samples = held_out_samples(args.data, args.styles or ev.styles)
    conds = make_conditionings(model, samples, LOSS_FAMILIES, ev, progress=True)
    rows = heldout_losses(model, samples, conds, ev, progress=True)
    print(format_loss_table(mean_loss_by_method(rows)))
    print(format_gains_by_noise_level(gains_by_noise_level(rows)))
    if not args.no_store:
        from i2l.store import Store, store_path

        store = Store(args.store or store_path(ecfg))
        with store.run("eval_loss", ecfg.name, ecfg.to_dict()) as run_id:
            store.record_eval_loss(run_id, rows)
        print(f"recorded in {store.path} as run {run_id}")
    return 0
