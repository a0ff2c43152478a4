"""The README's Python runs as written: every ```python block, in order, in a fresh interpreter."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_python() -> str:
    blocks = PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```python block"
    return "\n".join(blocks)


@pytest.mark.slow
def test_the_readme_python_runs_as_written(tmp_path):
    """Slow: the shipped model's dopri5 run in it takes a while on one core."""
    code = readme_python() + "\nassert not x.requires_grad and x.shape == (16, 1, 8, 8)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "51", result.stdout  # the NFE the snippet's comment states
