"""Each backend package's ``__init__`` is its whole API: nothing outside it reaches its private parts.

Ruff's PLC2701 checks this for code outside ``betty_like`` (tests, examples, benchmarks) but treats the
whole library as one package, so imports inside ``betty_like`` are checked here.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conv", "spiking", "kron")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` for every ``from ... import`` in ``path``."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_no_module_reaches_into_another_backend_package():
    offences = []
    for path in sorted((ROOT / "betty_like").rglob("*.py")):
        owner = ".".join(path.relative_to(ROOT).parts)
        for module, names in _imports(path):
            for name in PACKAGES:
                package = f"betty_like.backends.{name}"
                if owner.startswith(package + "."):
                    continue
                targets = [module] if module != package else [f"{package}.{n}" for n in names]
                if any(t.startswith(package + "._") for t in targets):
                    offences.append(f"{owner}: from {module} import {', '.join(names)}")
                if module == package and any(n.startswith("_") for n in names):
                    offences.append(f"{owner}: from {module} import {', '.join(names)}")
    assert not offences, offences


def test_the_registry_imports_no_backend():
    modules = [module for module, _ in _imports(ROOT / "betty_like" / "backends" / "registry.py")]
    assert not [m for m in modules if m.startswith("betty_like.backends.")], modules
