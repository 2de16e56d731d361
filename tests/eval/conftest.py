"""Fixtures the evaluation tests share."""

import pytest

from i2l.config import get_config


@pytest.fixture(scope="module")
def scorer_dir(debug_run, tmp_path_factory):
    """A 10-step toy CLIP for the debug world (the real one is trained by `i2l pretrain-scorer`)."""
    from i2l.toy.scorer import pretrain_toy_clip

    out = tmp_path_factory.mktemp("scorer")
    pretrain_toy_clip(get_config("debug"), debug_run.prepared_dir, out, progress=False)
    return out
