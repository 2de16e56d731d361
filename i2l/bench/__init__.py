"""Benchmarks: one module per measured stage (`python -m i2l.bench.<name>`), each with `add_arguments(p)` and
`run(args) -> list[dict]`, measuring i2l against the plain baseline it replaces, side by side in one run."""
