"""No unsafe deserialisation anywhere in the repository: pickles only through the restricted
unpickler of the release reader, checkpoints only with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import re

from tests.conftest import REPO

# Built from pieces so that this file does not match itself.
PICKLE_CALL = re.compile(r"\bpickle\." + r"loads?\(")
TORCH_LOAD = re.compile(r"\btorch\." + r"load\((?P<args>[^)]*)\)", re.S)


def _sources() -> list:
    skip = {".venv", ".git", "artifacts", "outputs", "multirun"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def test_no_plain_unpickling() -> None:
    found = [f"{p.relative_to(REPO)}:{n}" for p in _sources() for n, line in enumerate(p.read_text().splitlines(), 1)
             if PICKLE_CALL.search(line)]
    assert not found, f"plain pickle loading runs code from crafted files; use read_loc2id's unpickler: {found}"


def test_every_torch_load_is_weights_only() -> None:
    calls = [(p, m.group("args")) for p in _sources() for m in TORCH_LOAD.finditer(p.read_text())]
    assert calls, "the pattern finds the checkpoint loads"
    unsafe = [str(p.relative_to(REPO)) for p, args in calls if "weights_only=True" not in args]
    assert not unsafe, f"torch.load without weights_only=True unpickles arbitrary objects: {unsafe}"
