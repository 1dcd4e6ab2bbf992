"""Atomic artefact folders: a killed writer's leftovers are cleaned, a live writer's are not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from datamodules import artifacts
from datamodules.artifacts import atomic_dir


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path) -> None:
    final = tmp_path / "tokenizer-x"
    with atomic_dir(final) as tmp:
        (tmp / "codes.parquet").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "codes.parquet").write_text("half")
        raise RuntimeError("killed")
    assert (final / "codes.parquet").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer-x"]


def test_only_abandoned_temporary_folders_are_cleaned(tmp_path) -> None:
    final = tmp_path / "data-1234"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    host = artifacts._OWNER.rsplit("-", 1)[0]
    by_dead_run = tmp_path / f".tmp-{final.name}-{host}-{dead}-deadbeef"
    by_live_run = tmp_path / f".tmp-{final.name}-{host}-{os.getppid()}-cafecafe"  # another live process
    on_other_host = tmp_path / f".tmp-{final.name}-elsewhere-{dead}-12345678"
    for folder in (by_dead_run, by_live_run, on_other_host):
        folder.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "summary.json").write_text("{}")
    assert not by_dead_run.exists()
    assert by_live_run.exists() and on_other_host.exists()
    old = on_other_host.stat().st_mtime - artifacts._ABANDON_SECONDS - 10
    os.utime(on_other_host, (old, old))
    with atomic_dir(final):
        pass
    assert not on_other_host.exists() and by_live_run.exists()
