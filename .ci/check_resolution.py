"""Fails when pip has to backtrack to resolve one of the package's extras: the README's install commands must
resolve at once on a fresh machine (a resolver walking back through releases took 41 minutes once).

Each extra (and the combinations users name in the docs) is resolved with ``pip install --dry-run
--ignore-installed``, as on an empty environment, by the pip of the running interpreter (a fresh venv's own, as a
new user has it). Backtracking shows in pip's output as "pip is looking at multiple versions of ..."; a resolve
also fails past a time bound. Run from the repository root: ``python .ci/check_resolution.py [EXTRA ...]``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
TIME_BOUND_S = 600  # downloads of metadata included; a backtracking resolve takes far longer
COMBINATIONS = ["remote,hf,mlflow"]  # extras the docs install together
BACKTRACKING = "pip is looking at multiple versions of"


def extras() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return sorted(project["optional-dependencies"]) + COMBINATIONS


def resolve(extra: str) -> tuple[str, float, str | None]:
    """(extra, seconds, None or what went wrong)."""
    started = time.monotonic()
    # not --quiet: pip reports backtracking at its INFO level
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--progress-bar", "off",
               f".[{extra}]"]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIME_BOUND_S)
    except subprocess.TimeoutExpired:
        return extra, TIME_BOUND_S, f"not resolved within {TIME_BOUND_S} s"
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    walked = sorted({line.split(BACKTRACKING)[1].split()[0] for line in output.splitlines() if BACKTRACKING in line})
    if done.returncode:
        errors = [line for line in output.splitlines() if line.startswith("ERROR")]
        return extra, seconds, f"pip failed: {errors[-1] if errors else output.strip()[-300:]}"
    if walked:
        return extra, seconds, f"pip backtracked through versions of {', '.join(walked)}"
    return extra, seconds, None


def main() -> int:
    names = sys.argv[1:] or extras()
    with ThreadPoolExecutor(max_workers=2) as pool:  # mostly waiting on metadata downloads
        results = list(pool.map(resolve, names))
    failed = 0
    for extra, seconds, problem in results:
        print(f"[{extra}] {'resolved' if problem is None else problem} ({seconds:.0f} s)")
        failed += problem is not None
    if failed:
        print(f"{failed} extra(s) do not resolve at once: give pip the compatible set in pyproject.toml "
              "(lower bounds, or a package pulled in directly) rather than a constraints file", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
