"""The package is typed (`py.typed`): mypy --strict finds nothing in it (its
imports are not followed, which keeps this test quick)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tollgate"


def test_mypy_strict_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", "--follow-imports=skip", "--no-incremental", str(SRC)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_source_parses_as_python_3_9() -> None:
    """`requires-python >=3.9`: no syntax of a later Python (match, parenthesised
    context managers, ...). The whole suite also passed once on 3.9 with redis-py 7;
    this keeps the syntax honest where only a later Python is installed."""
    import ast

    for path in sorted(SRC.rglob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
