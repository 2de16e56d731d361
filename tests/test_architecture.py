"""The layout holds: the import contracts of .importlinter catch a broken layer, modules and functions stay small
enough to read at one sitting, and the top level of i2l/ is packages plus a few small modules."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80
TOP_LEVEL_MODULES = {"__init__.py", "config.py", "layout.py", "io.py"}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    # PYTHONPATH first: the copy's i2l and flows, not the installed ones, are analysed
    return subprocess.run([str(lint), "--no-cache"], check=False, cwd=root, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, timeout=300)


def _copy_tree(dest: Path) -> Path:
    for part in ("i2l", "flows"):
        shutil.copytree(REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", dest / ".importlinter")
    return dest


def test_the_tree_keeps_its_import_contracts(tmp_path):
    res = _lint_imports(_copy_tree(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:]


@pytest.mark.parametrize("module, line, contract", [
    ("i2l/model/lora.py", "import ray", "Model code imports no ray"),
    ("i2l/model/predictor.py", "import duckdb", "Only the store speaks SQL"),
    ("i2l/eval/heldout_loss.py", "import i2l.cli", "The library never imports the command line"),
    ("i2l/backbones/base.py", "import i2l.train.loop", "Packages are layered"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    root = _copy_tree(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    res = _lint_imports(root)
    assert res.returncode != 0
    broken = res.stdout.split("Broken contracts")[-1]
    assert contract in broken, res.stdout[-3000:]


def _python_files():
    return sorted(p for d in ("i2l", "flows") for p in (REPO / d).rglob("*.py"))


def test_no_module_is_longer_than_one_sitting():
    long = {str(p.relative_to(REPO)): n for p in _python_files()
            if (n := p.read_text().count("\n")) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split by concept): {long}"


def test_no_function_is_longer_than_a_screenful():
    long = {}
    for p in _python_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(REPO)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_top_level_holds_packages_and_a_few_small_modules():
    loose = {p.name for p in (REPO / "i2l").iterdir() if p.suffix == ".py" or (p.is_dir() and
                                                                              not (p / "__init__.py").exists()
                                                                              and p.name != "__pycache__")}
    assert loose <= TOP_LEVEL_MODULES, f"top-level modules beyond {sorted(TOP_LEVEL_MODULES)}: {sorted(loose)}"
