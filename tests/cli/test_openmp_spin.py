"""Every `i2l` command sets libgomp's spin count before torch loads, for itself and the processes it starts (a
stage's child, Ray's workers), so that its CPU threads do not stall when another process holds a core; a user's
own GOMP_SPINCOUNT wins."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys
from i2l.cli import main
rc = main(["info", "--preset", "debug"])
print("rc", rc, "spin", os.environ.get("GOMP_SPINCOUNT"), "torch loaded", "torch" in sys.modules, flush=True)
"""


def _run(extra: dict, script: str = SCRIPT) -> str:
    """`script` in a fresh Python, without the caller's GOMP_SPINCOUNT unless `extra` sets one."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | extra
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    return out.stdout + out.stderr


def test_commands_spin_briefly_and_a_users_setting_wins():
    got = _run({})
    assert "rc 0 spin 10000 torch loaded True" in got, got[-2000:]
    got = _run({"GOMP_SPINCOUNT": "300000"})
    assert "rc 0 spin 300000" in got, got[-2000:]


def test_the_spin_count_is_set_before_torch_loads():
    # libgomp reads it once, when torch loads it: set after that, it would do nothing in this process
    script = ("import sys, i2l.cluster as c\n"
              "orig = c.spin_briefly\n"
              "c.spin_briefly = lambda: (print('torch already loaded', 'torch' in sys.modules), orig())\n"
              "from i2l.cli import main\nmain(['info', '--preset', 'debug'])\n")
    got = _run({}, script)
    assert "torch already loaded False" in got, got[-2000:]
