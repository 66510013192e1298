"""The code stays lint-clean under the rules in pyproject.toml ([tool.ruff]): a change that leaves an unused
import, an unsorted import block or a line over 120 characters fails here, not in review."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "compress", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
