"""The docs site builds with ``mkdocs build --strict`` (broken links, missing pages, bad API references fail)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("Engine") > 3
    site = tmp_path / "site"
    for page in ("running", "tutorial", "coming_from_betty", "benchmarks", "examples/imaml_sinusoid"):
        assert (site / page / "index.html").exists(), page
    plots = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.png")}
    assert plots and {p.name for p in (site / "benchmarks" / "results").glob("*.png")} == plots  # the hook published them


def test_the_tutorial_runs_as_written():
    """Every python block of docs/tutorial.md, in order, in one namespace (its own asserts check the result)."""
    text = (ROOT / "docs" / "tutorial.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) >= 5
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/tutorial.md", "exec"), namespace)  # noqa: S102 (the docs' own code)
    assert namespace["status"].steps == 50
