"""What `make setup` leaves: a venv whose installed modules are byte-compiled."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="the suite runs outside the .venv that `make setup` builds")
def test_the_venvs_modules_are_byte_compiled():
    """The set-up compiles on every core (uv's --compile-bytecode, or pip --no-compile and then compileall: pip's own
    compile runs on one, ~80 s of its set-up on 2 cores). Without the .pyc files every process would compile torch
    & co. again on import where PYTHONDONTWRITEBYTECODE is set (~2.5 s per process), and `make run` and the suite
    start many."""
    for name in ("torch", "torch.nn.modules.linear", "transformers.modeling_utils", "diffusers", "prefect.flows",
                 "ray.actor", "open_clip"):
        source = importlib.import_module(name).__file__
        assert Path(importlib.util.cache_from_source(source)).is_file(), f"{name} is not byte-compiled ({source})"
