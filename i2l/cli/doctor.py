"""Check every configured checkpoint (backbone, encoder, scorers) before a long job, in seconds.

Reads config files and safetensors headers only (no weights): the class and variant (base / step-distilled),
sizes, dtype, the preset's LoRA target layers, the encoder's resolution and patch count against the preset,
missing or truncated files and shards, weights whose shape disagrees with their config. --load also loads each
component and runs one tiny forward. Prints a table with a fix per problem (--json: machine-readable).
Exit 0 when nothing is a problem, 1 otherwise.
"""

from i2l.cli import add_preset_args, config_from_args


def add_arguments(p):
    add_preset_args(p)
    p.add_argument("--json", action="store_true", help='print {"ok": ..., "components": [...]} instead of a table')
    p.add_argument("--load", action="store_true", help="also load each component and run one tiny forward")


def main(args):
    from i2l.doctor import diagnose

    report = diagnose(config_from_args(args), load=args.load)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1
