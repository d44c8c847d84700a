"""betty_like side by side with its peers: betty-ml 0.2.1, torchopt 0.7.3 and higher 0.2.1.

A thin driver: each comparison is a row module in ``benchmarks/peers/`` exposing
``section(quick, **options) -> str`` (a markdown section). The driver imports only the rows asked for
(``--rows``), so a row whose module is not in this checkout is reported as missing instead of failing
the others, and rewrites ``benchmarks/results/vs_peers.md`` from the sections it ran, keeping the
previous file's sections for rows not rerun (marked with the commit that holds them) so that a
partial rerun on a loaded machine never silently drops results.

Rows: ``reweighting`` (digits reweighting vs betty-ml, MLP and CNN), ``overhead`` (where an outer
step's time goes in both frameworks, by cProfile), ``unroll_memory`` (meta-gradient
through K unrolled steps vs torchopt and higher), ``ridge`` (implicit hypergradient of the closed-form
ridge vs torchopt), ``closed_form`` and ``dense_scaling``.

Runs in its own virtual environment (see ``benchmarks/README_peers.md``); betty-ml is loaded from an
unpacked wheel folder (``BETTY_PATH``, default ``.venv-peers/betty``) since its metadata refuses Python 3.11.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch
from peers.common import use_peer_paths

RESULTS = Path(__file__).parent / "results" / "vs_peers.md"
ROWS = ("reweighting", "overhead", "unroll_memory", "ridge", "closed_form", "dense_scaling")
BEGIN, END = "<!-- row: {} -->", "<!-- end row: {} -->"


def header(quick: bool) -> str:
    """Machine, versions and the measurement conventions every row shares."""
    versions = []
    for name in ("torchopt", "higher"):
        try:
            versions.append(f"{name} {getattr(importlib.import_module(name), '__version__', '0.2.1')}")
        except ImportError:
            versions.append(f"{name} (not installed)")
    try:
        import betty

        versions.insert(0, f"betty-ml {(Path(betty.__file__).parent / 'version.txt').read_text().strip()}")
    except ImportError:
        versions.insert(0, "betty-ml (not found)")
    return "\n".join([
        "# betty_like vs peers",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, one thread (`torch.set_num_threads(1)`). "
        f"Peers: {', '.join(versions)}.",
        "A shared machine: each section states the load average when it started; absolute times are noisy, the "
        "paired ratios less so. Times: median [min-max] over repeats, variants interleaved in one process. "
        "Ratio: betty_like / peer, paired per repeat (median [min-max]); below 1 = betty_like faster or smaller.",
        "Peak memory: increase of the peak resident set size (`VmHWM` of /proc/self/status; `ru_maxrss` survives exec "
        "and would report the parent's size) during the run, in a fresh subprocess per configuration (baseline after "
        "imports, data and model setup); whole-process memory, resolution about 1 MB."
        + (" `--quick` run." if quick else ""),
        "",
        "Each section is produced by `benchmarks/peers/<row>.py` (`python benchmarks/vs_peers.py --rows <row>`).",
    ])


def previous_sections(path: Path) -> dict[str, str]:
    """The sections of the previous results file, by row name (empty if it has none in this format)."""
    if not path.exists():
        return {}
    text = path.read_text()
    pattern = re.compile(r"<!-- row: (\w+) -->\n(.*?)\n<!-- end row: \1 -->", re.S)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


MARK = re.compile(r"(\n*_From (an earlier|the previous) run[^\n]*_)+$")
STAMP = re.compile(r"_Run started [^_\n]*\._")  # unique per row and run: how a kept section finds its commit


def commit_of(stamp: str) -> str:
    """Short hash of the last commit that added or removed ``stamp`` in the results file (the run's own commit)."""
    out = subprocess.run(["git", "log", "-1", "--format=%h", "-S", stamp, "--", RESULTS.name], capture_output=True,
                         text=True, cwd=RESULTS.parent, check=False)
    return out.stdout.strip() or "not yet committed"


def kept(text: str) -> str:
    """A section this invocation did not run, marked with the commit that holds it (found by its start stamp)."""
    text = MARK.sub("", text)
    if "_Not run:" in text:  # a placeholder for a missing row module: nothing was measured
        return text
    stamp = STAMP.search(text)
    return f"{text}\n\n_From the previous run, commit {commit_of(stamp.group(0)) if stamp else 'unknown'}._"


def write(head: str, ran: dict[str, str]) -> None:
    """The results file: the header, then each row's section in the order of ``ROWS``.

    Rows not run by this invocation are read from the file as it is now, not as it was at start, so
    that two drivers running different rows at once do not overwrite each other's sections.
    """
    bodies = {n: kept(t) for n, t in previous_sections(RESULTS).items() if n in ROWS and n not in ran}
    bodies.update(ran)
    parts = [head] + [f"{BEGIN.format(n)}\n{bodies[n].strip()}\n{END.format(n)}" for n in ROWS if n in bodies]
    RESULTS.write_text("\n\n".join(parts) + "\n")


def run_row(name: str, quick: bool, options: dict) -> str | None:
    """The row's markdown section, stamped with its start time; None when its module is not in this checkout."""
    try:
        module = importlib.import_module(f"peers.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"peers.{name}":
            raise
        print(f"row {name}: not run, benchmarks/peers/{name}.py is not in this checkout", flush=True)
        return None
    started, start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.perf_counter()
    text = module.section(quick, **options).strip()
    print(f"row {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return f"{text}\n\n_Run started {started}, row {name}._"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated, from {', '.join(ROWS)}; empty: only re-mark the kept sections")
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    parser.add_argument("--ks", default=None, help="unroll_memory: K values, e.g. 10,50,100")
    parser.add_argument("--width", type=int, default=None, help="unroll_memory: hidden width of the MLP (default 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (rows that time)")
    parser.add_argument("--nets", default=None, help="reweighting: networks, mlp,cnn (default both)")
    parser.add_argument("--defaults-nets", default=None, help="reweighting: networks of the defaults table (default mlp)")
    args = parser.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    torch.set_num_threads(1)
    use_peer_paths()
    options = {k: v for k, v in {"ks": args.ks, "width": args.width, "repeats": args.repeats, "nets": args.nets,
                                 "defaults_nets": args.defaults_nets}.items() if v is not None}
    ran: dict[str, str] = {}
    for name in ROWS:
        if name in rows:
            text = run_row(name, args.quick, options)
            if text is None and name in previous_sections(RESULTS):
                continue  # keep what an earlier run measured
            ran[name] = text or f"## {name}\n\n_Not run: `benchmarks/peers/{name}.py` is not in this checkout._"
            write(header(args.quick), ran)  # after every row: a run cut short keeps what it measured
    write(header(args.quick), ran)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
