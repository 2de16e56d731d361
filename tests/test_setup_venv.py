"""infra/setup-venv.sh, the set-up `make` runs: uv installs, pip where uv cannot, on a tiny project of its own
(so these tests reach the package registry, as `make setup` does, for uv and the build's setuptools)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "infra" / "setup-venv.sh"

pytestmark = pytest.mark.slow  # three venvs and three editable builds: ~1 min


def _project(root: Path) -> Path:
    proj = root / "proj"
    (proj / "tinyproj").mkdir(parents=True)
    (proj / "tinyproj" / "__init__.py").write_text("ANSWER = 42\n")
    (proj / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "tinyproj"\nversion = "0.1.0"\n\n[project.optional-dependencies]\ndev = []\n')
    return proj


def _setup(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    proj, venv = _project(tmp_path), tmp_path / "venv"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("I2L_SETUP", "I2L_UV", "VIRTUAL_ENV"))}
    done = subprocess.run([str(SCRIPT), sys.executable, str(venv), str(proj)], env={**run_env, **env},
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import tinyproj; print(tinyproj.ANSWER)"],
                         check=False, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr  # installed, editable: the project's own source
    return done, venv


def _installer(venv: Path) -> str:
    (info,) = venv.glob("lib/python*/site-packages/tinyproj-0.1.0.dist-info")
    return (info / "INSTALLER").read_text().strip()


def test_setup_installs_with_uv(tmp_path):
    done, venv = _setup(tmp_path)
    assert _installer(venv) == "uv"
    assert "installing with pip instead" not in done.stderr


def test_setup_falls_back_to_pip_when_uv_cannot_be_had(tmp_path):
    # a package no index has: pip cannot install "uv", and the set-up says so and goes on with pip
    done, venv = _setup(tmp_path, I2L_UV_PACKAGE="i2l-no-such-package-as-this-uv")
    assert _installer(venv) == "pip"
    assert "installing with pip instead" in done.stderr


def test_setup_with_pip_when_asked(tmp_path):
    _, venv = _setup(tmp_path, I2L_SETUP_WITH="pip")
    assert _installer(venv) == "pip"
    assert not (venv / "bin" / "uv").exists()
