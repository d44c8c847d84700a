"""The wheel carries the Hydra configs, so ``betty-like experiment=...`` works from an installed package."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def clean_copy(target: Path) -> Path:
    """The checkout's files as git sees them, without build leftovers (an egg-info would list the configs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def test_the_wheel_contains_every_packaged_config(tmp_path):
    source = clean_copy(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("betty_like-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "betty_like" / "configs").rglob("*.yaml"))
    assert "betty_like/configs/config.yaml" in configs and any("/experiment/" in c for c in configs)
    assert [c for c in configs if c not in shipped] == []
    assert "betty_like/cli.py" in shipped
