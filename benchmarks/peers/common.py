"""What every row of the peer benchmark shares: where the peers live, peak memory, medians and ratios."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BETTY_PATH = os.environ.get("BETTY_PATH", str(ROOT / ".venv-peers" / "betty"))


def use_peer_paths() -> None:
    """Put the examples folder and the unpacked betty-ml wheel (its metadata refuses Python 3.11) on ``sys.path``."""
    for path in (str(ROOT / "examples"), BETTY_PATH):
        if path not in sys.path:
            sys.path.insert(0, path)


def maxrss_mb() -> float:
    """Peak resident set size of this process in MB: ``VmHWM`` from /proc (Linux), else ``ru_maxrss``.

    ``ru_maxrss`` survives ``execve`` on Linux, so a child forked from a large parent starts at the
    parent's size; ``VmHWM`` belongs to the new address space and starts fresh.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """Median with the min-max range, e.g. ``1.23 [1.1-1.5]``."""
    return f"{med(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def ratio(a: Sequence[float], b: Sequence[float]) -> str:
    """Paired per-repeat ratio a / b: median with its min-max range."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return f"{med(r):.2f} [{min(r):.2f}-{max(r):.2f}]"


def child_output(script: str | Path, args: Sequence[str]) -> str:
    """Run ``script --child ARGS`` in a fresh interpreter (so its peak memory is its own); its last stdout line."""
    cmd = [sys.executable, str(script), "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]
