"""The toy image encoder's pretraining runs in a child process of its own (flows/pretrain_toy.py), beside the toy
scorer's: it reads prompt words, not the toy backbone, so it must not pay for importing diffusers (~5 s a process
here), nor must the scorer's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["i2l.toy.encoder_pretrain", "i2l.toy.scorer"])
def test_pretraining_the_toy_encoder_or_scorer_imports_no_diffusers(module):
    script = f"import json, sys, {module}\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('diffusers'))))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
