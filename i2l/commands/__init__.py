"""CLI subcommands. Each module: a docstring (its help), `add_arguments(parser)` and `main(args) -> int`."""
