"""Imports go one way: experiments -> hypergrad -> optimizers -> torch. Nothing imports experiments."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import optimizers, hypergrad
leaked = sorted(m for m in sys.modules if m == "experiments" or m.startswith("experiments."))
assert not leaked, f"importing optimizers/hypergrad pulled in {leaked}"
print("ok")
"""


def test_library_does_not_import_experiments():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
