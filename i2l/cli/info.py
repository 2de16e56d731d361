"""Print the resolved config of a preset and the sizes of its models (backbone, encoder, predictor)."""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--no-models", action="store_true", help="print the config only (no model is built)")


def main(args):
    from i2l.backbones.sizes import describe

    cfg = config_from_args(args)
    print(cfg.to_json())
    if not args.no_models:
        for line in describe(cfg):
            print(line)
    return 0
