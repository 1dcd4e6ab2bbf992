"""A normal Python project: every imported package pinned, test tools apart, `pip check` explained."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.conftest import REPO

OWN = {"datamodules", "location_tokenizers", "lightning_modules", "pipeline", "run", "tests", "benchmarks"}


def _pins(name: str) -> set[str]:
    lines = (REPO / name).read_text().splitlines()
    return {re.split(r"[=<>~ ]", ln.strip())[0].lower().replace("_", "-") for ln in lines if ln.strip() and not ln.startswith("#")}


def _imported(folders: list[str]) -> set[str]:
    """Top-level modules imported anywhere in these folders (or files)."""
    names: set[str] = set()
    for folder in folders:
        path = REPO / folder
        for file in [path] if path.is_file() else path.rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - OWN - set(sys.stdlib_module_names) - {"__future__"}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    known = packages_distributions()
    return {m: {d.lower().replace("_", "-") for d in known.get(m, [])} for m in modules}


def test_every_directly_imported_package_is_pinned() -> None:
    runtime = _pins("requirements.txt") | _pins("requirements-nodeps.txt")
    test_only = _pins("requirements-test.txt")
    for module, dists in _distributions(_imported(["datamodules", "location_tokenizers", "lightning_modules", "pipeline", "run.py"])).items():
        assert dists & runtime, f"{module} (from {sorted(dists)}) is imported by the suite but not pinned in requirements.txt"
    for module, dists in _distributions(_imported(["tests", "benchmarks"])).items():
        assert dists & (runtime | test_only), f"{module} (from {sorted(dists)}) is imported by tests but pinned nowhere"
    assert not test_only & _pins("requirements.txt"), "test tools stay out of the runtime requirements"


def test_pyproject_reads_the_same_pins_and_enforces_python_311() -> None:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["requires-python"] == ">=3.11,<3.12"
    dynamic = meta["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["optional-dependencies"]["test"]["file"] == ["requirements-test.txt"]
    assert "tool" in meta and "pytest" in meta["tool"] and not (REPO / "pytest.ini").exists()


def test_pip_check_reports_only_what_the_readme_explains() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    broken = [ln for ln in done.stdout.splitlines() if ln.strip() and "No broken requirements" not in ln]
    nodeps = _pins("requirements-nodeps.txt")
    readme = (REPO / "README.md").read_text()
    for line in broken:
        package = line.split()[0].lower()
        assert package in nodeps, f"pip check: {line}"
        assert package in readme, f"the README does not explain: {line}"
