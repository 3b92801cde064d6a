"""The tree keeps one style: ruff's lint rules and its formatter, as pyproject.toml [tool.ruff] sets
them (`make lint` runs the same two checks; `ruff format` fixes what the second one reports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATHS = ["mt", "scripts", "benchmarks", "tests"]
RUFF = Path(sys.executable).with_name("ruff")  # the dev extra installs it into the venv


def ruff(*args: str) -> subprocess.CompletedProcess:
    if not RUFF.exists():
        pytest.skip(f"ruff is not installed next to {sys.executable} (pip install -e '.[dev]')")
    return subprocess.run([str(RUFF), *args, *PATHS], cwd=REPO, capture_output=True, text=True)


def test_lint_rules_hold():
    r = ruff("check", "--no-cache")
    assert r.returncode == 0, r.stdout + r.stderr


def test_tree_is_formatted():
    r = ruff("format", "--check", "--no-cache")
    assert r.returncode == 0, "run `ruff format`:\n" + r.stdout + r.stderr
