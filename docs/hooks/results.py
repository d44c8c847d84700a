"""mkdocs hook: publish benchmarks/results (tables and plots) in the site, without copies in docs/."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files, config):
    """Add every results table and plot as ``benchmarks/results/<name>``, as written by the benchmarks."""
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png"):
            files.append(File(f"benchmarks/results/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    return files
