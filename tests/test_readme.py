"""The README's Python snippets, run as a reader would paste them: each ```python block in a fresh interpreter in an
empty folder; where the README shows the block's output (a plain ``` block right after it), that output."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\n```\n(.*?)```\n)?", re.S)


def snippets() -> list[tuple[str, str | None]]:
    "(code, shown output or None) of every ```python block of README.md, in order."
    return [(m[1], m[2]) for m in BLOCK.finditer((ROOT / "README.md").read_text(encoding="utf-8"))]


def test_the_readme_has_python_snippets():
    found = snippets()
    assert len(found) >= 2, found  # the presets table and train_and_evaluate
    assert any("train_and_evaluate" in code for code, _ in found)


@pytest.mark.parametrize("i", range(len(snippets())))
def test_readme_python_snippet_runs_as_written(i, tmp_path):
    code, shown = snippets()[i]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"README snippet {i + 1} failed:\n{code}\n{r.stderr[-3000:]}"
    if shown is not None:
        assert r.stdout.rstrip() == shown.rstrip(), f"README snippet {i + 1} prints something else than the README shows:\n{r.stdout}"
