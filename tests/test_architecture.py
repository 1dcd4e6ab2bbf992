"""The layer rule and what it buys: import-linter contracts, a light ``run.py``, one atomic writer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LIBRARIES = ("datamodules", "location_tokenizers", "lightning_modules")
HEAVY = ("torch", "lightning", "transformers", "peft", "polars")
RENAMES = re.compile(r"os\.(replace|rename)\(|shutil\.move\(|\btmp\w*\.(replace|rename)\(")
# Files that move whole finished things, never write one: why each may rename.
MOVERS = {
    "archives.py": "installs verified downloaded entries into a user's data folder",
    "align.py": "moves an unreadable last.ckpt aside before training starts afresh",
}


def test_import_linter_contracts_hold() -> None:
    """Layers (pipeline > lightning_modules > location_tokenizers > datamodules), no Hydra/OmegaConf in the
    libraries, no import cycles inside a package: the contracts of pyproject.toml, checked by lint-imports."""
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_run_py_loads_no_heavy_library_before_a_stage_runs() -> None:
    """`python run.py --help` (and tab completion) load only Hydra and the typed config: no torch."""
    code = "import sys; import run; print(sorted(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_help_answers() -> None:
    out = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "experiment:" in out.stdout and "Traceback" not in out.stderr


def test_one_atomic_writer() -> None:
    """Only datamodules/artifacts.py renames files into place and builds temporary names; every other
    writer goes through it (atomic_file, atomic_dir, write_text_atomic, write_json_atomic, temp_path)."""
    offenders = []
    for path in [*REPO.glob("datamodules/**/*.py"), *REPO.glob("location_tokenizers/*.py"), *REPO.glob("lightning_modules/*.py"),
                 *REPO.glob("pipeline/*.py"), REPO / "run.py"]:
        if path.name == "artifacts.py":
            continue
        text = path.read_text()
        if "mkstemp" in text or "mkdtemp" in text or '".tmp-' in text or "f\".tmp" in text:
            offenders.append(f"{path.relative_to(REPO)}: builds its own temporary name")
        if RENAMES.search(text) and path.name not in MOVERS:
            offenders.append(f"{path.relative_to(REPO)}: renames files itself")
    assert not offenders, offenders


def test_libraries_never_take_a_hydra_node() -> None:
    """No library module mentions DictConfig or OmegaConf (the contracts forbid the import; this also
    catches a duck-typed ``cfg.get(...)`` helper coming back)."""
    found = [str(p.relative_to(REPO)) for pkg in LIBRARIES for p in (REPO / pkg).rglob("*.py")
             if "DictConfig" in p.read_text() or "OmegaConf" in p.read_text()]
    assert not found, found
