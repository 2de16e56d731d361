"""Every training loop's first losses on the debug preset equal the golden file, exactly (CPU, fp32)."""

import json

from golden_losses import GOLDEN_PATH, STEPS, loop_losses


def test_each_training_loop_reproduces_its_golden_losses(debug_run, tmp_path):
    golden = json.loads(GOLDEN_PATH.read_text())
    got = loop_losses(debug_run, tmp_path)
    assert set(got) == set(golden)
    for name, losses in golden.items():
        assert len(losses) == STEPS, name
        assert got[name] == losses, f"{name}: {got[name]} != golden {losses} (see tests/golden_losses.py)"
