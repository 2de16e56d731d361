"""Every training loop's first losses on the debug preset equal the golden file, to float32 rounding (CPU)."""

import json
import math

from golden_losses import GOLDEN_PATH, REL_TOL, STEPS, loop_losses


def test_each_training_loop_reproduces_its_golden_losses(debug_run, tmp_path):
    golden = json.loads(GOLDEN_PATH.read_text())
    got = loop_losses(debug_run, tmp_path)
    assert set(got) == set(golden)
    for name, losses in golden.items():
        assert len(losses) == STEPS, name
        close = all(math.isclose(g, w, rel_tol=REL_TOL, abs_tol=0.0) for g, w in zip(got[name], losses))
        assert close, f"{name}: {got[name]} != golden {losses} (see tests/golden_losses.py)"
