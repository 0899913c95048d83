"""What the packages import is what `pip install scalegp` installs: every third-party module imported
anywhere in `scalegp`, `pyro_scalegp`, `numpyro_scalegp` and `kernels_cuda` (at the top of a module or
inside a function) belongs to a distribution named in pyproject's `[project] dependencies`, not only in an
extra that `make test` happens to install (`import pyro_scalegp` once failed on a plain install for want of
`linear_operator`). Modules imported by name at run time are not seen: `kernels_cuda.gpu` loads CuPy, the
optional `cuda` / `cuda13` extra, by `importlib.import_module`."""
from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("scalegp", "pyro_scalegp", "numpyro_scalegp", "kernels_cuda")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module names of the absolute imports in the packages' sources, with the files."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", req).group()) for req in project["dependencies"]}


def test_every_imported_distribution_is_a_declared_dependency():
    declared = _declared()
    distributions = importlib.metadata.packages_distributions()
    modules = _imported_modules()
    third_party = sorted(set(modules) - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"})
    assert {"torch", "pyro", "jax", "numpyro", "linear_operator"} <= set(third_party)  # the scan sees imports
    missing = {}
    for module in third_party:
        owners = distributions.get(module)
        assert owners, f"{module} (imported by {sorted(modules[module])}) is not installed"
        if not {_canonical(owner) for owner in owners} & declared:
            missing[module] = (owners, sorted(modules[module]))
    assert not missing, f"imported but not in [project] dependencies: {missing}"
