"""The one way to run code with a given number of torch threads and give the caller back its own setting: training
loops (the toy scorer's) and benchmarks also run in-process (tests, notebooks), where a leaked count slows, and
changes the float reductions of, everything that follows."""

import contextlib


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n torch intra-op threads (None / 0 / negative: as set), then restore the previous count."""
    import torch  # here: benchmarks import this to build `i2l --help`, which must not load torch

    before = torch.get_num_threads()
    if n and n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
