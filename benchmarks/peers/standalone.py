"""What a row module needs to time its variants and to run on its own as a script.

The driver (``benchmarks/vs_peers.py``) imports a row's ``section(quick)``; run as a script, the same
row writes its own results file, so its numbers exist without the driver.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions called in turn within every repeat (after a warm-up).

    Interleaving spreads a shared machine's load changes over every variant alike, so that ratios
    paired per repeat compare the variants under the same load.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run_row(section: Callable[[bool], str], results: Path, plot: Path, description: str, quick_help: str,
            argv: list[str] | None = None) -> None:
    """Parse ``--quick``, run the row's section, write it to ``results`` (its plot is at ``plot``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    text = section(args.quick)
    results.parent.mkdir(exist_ok=True)
    results.write_text(text)
    print(text)
    print(f"wrote {results} and {plot}")
