"""The lint (ruff, configured in pyproject.toml: pycodestyle errors and warnings, pyflakes, import order, lines of at
most 120 characters) passes on the whole repository, so CI runs it through the README's test command."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it is in requirements-test.txt): pip install ruff")
def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ruff found problems (fix them, or run 'ruff check --fix .'):\n{r.stdout}{r.stderr}"
