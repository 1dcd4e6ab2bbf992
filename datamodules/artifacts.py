"""Atomic artefact writing: a killed run never leaves a half-written file or folder behind.

Everything is written under a temporary name next to its final path and renamed into place
(``os.replace`` is atomic on one filesystem). Readers therefore see either the old artefact or the
complete new one. Each stage's result JSON carries a manifest (size and SHA-256 of every artefact),
so reuse verifies what it reuses instead of trusting that a file exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# Temporary folders carry their writer (host and pid), so that a run cleans only what a dead run
# left behind, never the folder another process (a grid point on the same machine) is writing.
_OWNER = f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"
_ABANDON_SECONDS = 24 * 3600


def _abandoned(tmp: Path) -> bool:
    """A temporary folder whose writer is gone: same host and dead pid, or older than a day."""
    try:
        if time.time() - tmp.stat().st_mtime > _ABANDON_SECONDS:
            return True
    except FileNotFoundError:
        return False
    parts = tmp.name.split("-")
    host, pid = (parts[-3], parts[-2]) if len(parts) >= 3 else ("", "")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def temp_path(final: str | Path) -> Path:
    """The one naming rule of work in progress: ``.tmp-<name>-<host>-<pid>-<random>`` beside ``final``.

    Beside it, because ``os.replace`` is atomic only within one filesystem; unique, so that two writers
    (grid points, a test beside a long run) never share one; hidden, so that no reader takes it for a
    result; with its writer, so that :func:`atomic_dir` cleans only what a dead process left."""
    final = Path(final)
    return final.parent / f".tmp-{final.name}-{_OWNER}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file to write; on success it replaces ``path`` (0644 under the usual umask).

    A reader sees the old file or the complete new one, never a partial write; after a failure or a
    kill nothing named ``path`` changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``final`` whole.

    Args:
        final: The folder to (re)create.
        replace: Replace an existing ``final``; False: the first complete writer wins (caches that
            several processes may fill at once), and a later one discards its copy.

    Yields:
        The temporary folder to write into. If the block raises (or the process dies), ``final``
        is untouched and the temporary folder is removed (or, after a kill, left under a
        ``.tmp-`` name that no reader looks at and the next run cleans).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".tmp-{final.name}-*"):
        if _abandoned(stale):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        share(tmp)
        if final.exists() and not replace:
            return
        trash = None
        if final.exists():
            trash = temp_path(final.parent / f"{final.name}-old")
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_UMASK = os.umask(0)
os.umask(_UMASK)


def share(folder: str | Path) -> None:
    """Give a finished folder the modes of a plain ``cp`` (0644 files, 0755 folders under the usual
    umask): some writers (safetensors) create 0600 files, which nobody else could read or copy."""
    folder = Path(folder)
    folder.chmod(0o777 & ~_UMASK)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able config, to tell whether an artefact matches it."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a 400 MB input costs about a second, not its size in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: str | Path, names: Iterable[str], skip: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of the named files of a stage folder (a named folder is walked).

    Each stage stores it in the result JSON it writes last, so reuse can tell a finished artefact from a
    truncated, deleted or edited one. ``skip``: relative paths left out (documentation that a later
    stage completes, such as the model card)."""
    folder = Path(folder)
    out: dict[str, dict[str, Any]] = {}
    skipped = set(skip)
    for name in names:
        path = folder / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            rel = str(f.relative_to(folder))
            if rel not in skipped:
                out[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def manifest_problem(folder: str | Path, manifest: dict[str, dict[str, Any]] | None) -> str | None:
    """What is wrong with a stage folder against its manifest (None: every file is as written)."""
    if not manifest:
        return "it has no manifest of its files (written by an older version)"
    folder = Path(folder)
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"] or sha256_file(path) != want["sha256"]:
            return f"{path} changed since the stage wrote it ({path.stat().st_size} bytes, {want['size']} written)"
    return None


_SAID_REUSED: set[str] = set()


def reusable(out: Path, result_file: str, files: tuple[str, ...], fp: str, force: bool, stage: str | None = None) -> dict[str, Any] | None:
    """The stored result of a stage whose artefacts match its config and its manifest, else None.

    A result file that does not parse, or an artefact that is missing or differs from the manifest, is
    said in one log line and the stage is rebuilt (the stage that owns the broken artefact, whatever stage
    was asked for).

    Args:
        stage: Name to log the skip under (nothing is logged without it).
        out: The stage's folder.
        result_file: The JSON written last (it carries the ``fingerprint`` and the ``manifest``).
        files: Every artefact that must exist.
        fp: The current config's fingerprint.
        force: Recompute regardless.
    """
    path = Path(out) / result_file
    if force or not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (ValueError, OSError):  # cut or corrupt JSON (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        log.warning("%s: %s is unreadable (cut or corrupt); rebuilding the %s stage", stage or "stage", path, stage or "")
        return None
    if not isinstance(old, dict) or old.get("fingerprint") != fp:
        return None
    missing = [f for f in files if not (Path(out) / f).is_file()]
    problem = f"{Path(out) / missing[0]} is missing" if missing else manifest_problem(out, old.get("manifest"))
    if problem:
        log.warning("%s: %s; rebuilding the %s stage (force=true does the same)", stage or "stage", problem, stage or "")
        return None
    if stage:
        # Said once per folder and process: later stages check their inputs again, which is no news.
        said = f"{stage}:{out}"  # align and test share a run folder: each stage says it once
        level = logging.DEBUG if said in _SAID_REUSED else logging.INFO
        _SAID_REUSED.add(said)
        log.log(level, "%s: artefacts in %s match the config and their manifest; skipping (force=true recomputes)", stage, out)
    return old
