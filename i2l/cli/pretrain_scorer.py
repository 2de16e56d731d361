"""Train the toy CLIP scorer (a tiny open_clip model) on toy images <-> content prompts and style descriptions.

Reads a prepared dir (train/part-*.parquet; only the train split) or a raw MegaStyle-layout dir
(train-*.parquet), and writes model.safetensors + the open_clip model config + scorer.json to --out.
CLIP-Text / CLIP-Style then run on it through the same open_clip code as ViT-H-14.
"""

from pathlib import Path

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--data", default=None,
                   help="training rows: a prepared dir or a toy world dir (default: <data-root>/prepared/<preset> "
                        "if it has a train split, else <data-root>/toyworld/<preset>)")
    p.add_argument("--out", default=None, help="output dir (default: <data-root>/toy/<preset>/scorer)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: scorer.pretrain_steps)")


def main(args):
    from i2l.eval.metrics import default_scorer_dir
    from i2l.layout import paths_for
    from i2l.toy.scorer import pretrain_toy_clip
    from i2l.train.run_key import forget_run_key

    cfg = config_from_args(args)
    if args.steps is not None:
        cfg.scorer.pretrain_steps = args.steps
    if args.data:
        data = Path(args.data)
    else:
        paths = paths_for(cfg)  # where `i2l prepare` / `i2l toyworld` write for this preset
        prepared = paths.prepared_dir
        data = prepared if (prepared / "train").is_dir() else paths.toyworld_dir
    if not data.is_dir():
        raise FileNotFoundError(f"data dir {data} not found: run `i2l toyworld` (or `i2l prepare`) first, "
                                f"or pass --data DIR")
    out = Path(args.out) if args.out else Path(default_scorer_dir(cfg))
    forget_run_key(out)  # a hand-made scorer is no flow stage's output
    info = pretrain_toy_clip(cfg, data, out)
    held = info.get("heldout") or {}
    acc = (f"; held-out pair accuracy text {held['text_pair_acc']:.3f}, style {held['style_pair_acc']:.3f} "
           f"on {held['rows']} val rows") if held else ""
    print(f"toy scorer: {info['steps']} steps on {info['rows']} rows ({info['styles']} styles) in "
          f"{info['seconds']:.1f} s, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}{acc} -> {out}")
    return 0
