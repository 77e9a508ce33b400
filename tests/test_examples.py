"""Every script in docs/examples runs to completion: each one asserts the claims it illustrates."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.py"))


def test_examples_exist():
    assert EXAMPLES, "no docs/examples/*.py found"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script.name} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
