"""The benchmark scripts keep working as the package changes: every name they import from simmim_cli, or from
one another, still exists. (They are run by hand, before and after a change, so a broken import is found only
when someone needs the figure.)"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def imported_names(script: Path) -> list[tuple[str, str]]:
    """(module, name) of each ``from simmim_cli... import name`` and ``from <sibling script> import name``."""
    siblings = {path.stem for path in SCRIPTS}
    pairs = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "simmim_cli" or node.module in siblings:
                pairs.extend((node.module, alias.name) for alias in node.names)
    return pairs


def test_the_scripts_import_from_the_package_at_all():
    assert len(SCRIPTS) >= 5
    assert sum(len(imported_names(script)) for script in SCRIPTS) >= 20


@pytest.mark.parametrize("script", SCRIPTS, ids=[path.name for path in SCRIPTS])
def test_every_name_a_benchmark_imports_exists(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    missing = []
    for module_name, name in imported_names(script):
        module = importlib.import_module(module_name)
        if not hasattr(module, name) and importlib.util.find_spec(f"{module_name}.{name}") is None:
            missing.append(f"from {module_name} import {name}")
    assert not missing, f"{script.name}: " + "; ".join(missing)
    for stem in {path.stem for path in SCRIPTS}:
        sys.modules.pop(stem, None)  # a sibling imported here is not the next test's


@pytest.mark.slow
def test_the_gpu_script_runs_each_check_with_options_it_takes():
    """benchmarks/on_gpu.sh is run on a lent GPU machine for a few minutes: a renamed option found only there
    costs the lease. Every benchmark, test file and simmim command it names exists and takes the options it gives."""
    script = BENCHMARKS / "on_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    commands = [line.split("python3", 1)[1].split() for line in text.splitlines()
                if line.strip().startswith("step ") and "python3" in line]
    assert len(commands) >= 5
    for words in commands:
        if words[:2] == ["-m", "pytest"]:
            assert all((BENCHMARKS.parent / word).is_file() for word in words if word.startswith("tests/"))
            continue
        program = words[:words.index(next(w for w in words if w.startswith("--")))]  # the script or -m module
        program = [sys.executable, *(str(BENCHMARKS.parent / w) if w.endswith(".py") else w for w in program)]
        shown = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "COLUMNS": "200"})
        assert shown.returncode == 0, shown.stderr
        options = {word for word in words if re.fullmatch(r"--[a-z][a-z0-9-]*", word)}
        assert options and all(option in shown.stdout for option in options), (program, options, shown.stdout)
