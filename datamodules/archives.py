"""What a dataset download is and what happens to its archive: extraction member by member with path
checks (no zip-slip, no absolute paths, no escaping links, no devices), finding the expected files,
verifying them (sha256, or column and row counts) and installing them without overwriting anything.
:mod:`datamodules.download` fetches the archive and calls these in turn."""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import urllib.parse
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from datamodules.errors import DataError

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a responsive progress bar.
# Folders and files that macOS archivers add; they are never data and only confuse the locator.
_JUNK_DIRS = frozenset({"__MACOSX"})


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and how to recognise a correct copy of it.

    Attributes:
        name: Short identifier, e.g. ``"qtmob_nyc"``; used in messages and temp-file names.
        url: Archive URL (``.zip``, ``.tar.gz``/``.tgz``/``.tar``, ``.gz``, or a plain file).
        expected_files: Paths relative to the dataset root that must exist afterwards. A trailing
            ``/`` marks a folder (e.g. ``"prompts/"``).
        sha256: Relative path -> expected sha256 (hex) for files whose hash is known.
        archive_sha256: Expected sha256 of the downloaded archive itself, if known.
        header_check: Relative path -> expected number of tab-separated columns of the first
            line; a plausibility check for files without a known hash (``.gz`` files are read
            decompressed).
        min_rows: Relative path -> minimum number of lines; catches truncated files.
    """

    name: str
    url: str
    expected_files: tuple[str, ...]
    sha256: dict[str, str]
    archive_sha256: str | None = None
    header_check: dict[str, int] | None = None
    min_rows: dict[str, int] | None = None



def extract(source: DatasetSource, archive: Path, tree: Path) -> None:
    """Unpack (or copy) the downloaded payload into the empty folder ``tree``.

    Raises:
        DataError: if the payload is not of the type its URL promises, is corrupt, or is unsafe.
    """
    kind = archive_kind(source.url)
    with open(archive, "rb") as fh:
        magic = fh.read(4)
    try:
        if kind == "zip":
            if not zipfile.is_zipfile(archive):
                raise _format_error(source, "a zip archive", magic)
            _extract_zip(source, archive, tree)
        elif kind == "tar":
            if not tarfile.is_tarfile(archive):
                raise _format_error(source, "a tar archive", magic)
            _extract_tar(source, archive, tree)
        elif kind == "gz":
            if magic[:2] != b"\x1f\x8b":
                raise _format_error(source, "a gzip file", magic)
            _place_single(source, archive, tree, gunzip=True)
        else:
            _place_single(source, archive, tree, gunzip=False)
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise DataError(f"Dataset '{source.name}': the archive from {source.url} is corrupt: {exc}") from None


def _format_error(source: DatasetSource, what: str, magic: bytes) -> DataError:
    """Error for a payload of the wrong type (typically an HTML page or a Git LFS pointer)."""
    return DataError(
        f"Dataset '{source.name}': the file downloaded from {source.url} is not {what} "
        f"(it starts with {magic!r}; maybe an HTML error page or a Git LFS pointer)."
    )


def _safe_parts(source: DatasetSource, name: str) -> list[str]:
    """Split an archive member name into path parts, refusing anything that could escape.

    Raises:
        DataError: for absolute paths, drive letters or ``..`` components.
    """
    norm = name.replace("\\", "/")  # Windows-made archives may use backslashes as separators
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise _unsafe(source, name, "absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _unsafe(source, name, "'..' in path")
    return parts


def _is_junk(parts: list[str]) -> bool:
    """macOS metadata (``__MACOSX/``, AppleDouble ``._*`` files): skipped, never data."""
    return bool(parts) and (parts[0] in _JUNK_DIRS or parts[-1].startswith("._"))


def _unsafe(source: DatasetSource, member: str, why: str) -> DataError:
    return DataError(
        f"Dataset '{source.name}': refusing to extract the archive from {source.url}: "
        f"member {member!r} is unsafe ({why}). Nothing was written."
    )


def _extract_zip(source: DatasetSource, archive: Path, tree: Path) -> None:
    """Extract a zip member by member after validating every name (zip-slip safe)."""
    base = tree.resolve()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # Validate everything first, so an unsafe member aborts before any byte is written.
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        for info in infos:
            parts = _safe_parts(source, info.filename)
            if not parts or _is_junk(parts):
                continue
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _unsafe(source, info.filename, "symbolic link")
            plan.append((info, parts))
        for info, parts in plan:
            dest = tree.joinpath(*parts)
            # Belt and braces: the resolved target must stay inside the staging tree.
            if not dest.resolve().is_relative_to(base):
                raise _unsafe(source, info.filename, "resolves outside the target folder")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)


def _extract_tar(source: DatasetSource, archive: Path, tree: Path) -> None:
    """Extract a (compressed) tar after validating names and link targets."""
    with tarfile.open(archive, "r:*") as tf:
        members: list[tarfile.TarInfo] = []
        for member in tf.getmembers():
            parts = _safe_parts(source, member.name)
            if not parts or _is_junk(parts):
                continue
            if member.issym() or member.islnk():
                link = member.linkname.replace("\\", "/")
                if link.startswith("/"):
                    raise _unsafe(source, member.name, f"link to absolute path {member.linkname!r}")
                # Symlinks resolve relative to their folder, hard links relative to the archive root.
                start = posixpath.dirname("/".join(parts)) if member.issym() else ""
                target = posixpath.normpath(posixpath.join(start, link))
                if target == ".." or target.startswith("../"):
                    raise _unsafe(source, member.name, f"link escapes the target folder ({member.linkname!r})")
            elif not (member.isfile() or member.isdir()):
                raise _unsafe(source, member.name, "device or fifo")
            members.append(member)
        if hasattr(tarfile, "data_filter"):
            # The stdlib 'data' filter repeats these checks and also strips unsafe modes.
            tf.extractall(tree, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members were validated above
            tf.extractall(tree, members=members)


def _place_single(source: DatasetSource, payload: Path, tree: Path, gunzip: bool) -> None:
    """Put a non-archive payload (plain file or single ``.gz``) into ``tree`` under the right name.

    A ``.gz`` stays compressed when the expected file name itself ends with ``.gz`` (the readers
    stream it); otherwise it is decompressed.
    """
    url_name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(source.url).path)) or source.name
    files = [f for f in source.expected_files if not f.endswith("/")]
    if len(files) == 1:
        target_name = files[0]
    elif gunzip and url_name not in files:
        target_name = url_name[: -len(".gz")] if url_name.lower().endswith(".gz") else url_name
    else:
        target_name = url_name
    keep_compressed = not gunzip or target_name.lower().endswith(".gz")
    parts = _safe_parts(source, target_name)
    dest = tree.joinpath(*parts)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if keep_compressed:
        shutil.copyfile(payload, dest)
    else:
        with gzip.open(payload, "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)


# ----------------------------------------------------------------------------------------------
# Locate, verify, install
# ----------------------------------------------------------------------------------------------


def locate(tree: Path, expected: tuple[str, ...]) -> Path:
    """The folder inside ``tree`` that holds the most expected entries (shallowest on ties).

    Archives often wrap the data in a top-level folder (``foursquare_NYC/``); we look for it
    rather than hard-coding its name, which differs between releases.
    """
    best: Path = tree
    best_key: tuple[int, int, str] | None = None
    for dirpath, dirnames, _ in os.walk(tree):  # does not follow symlinks
        dirnames[:] = sorted(d for d in dirnames if d not in _JUNK_DIRS)
        folder = Path(dirpath)
        depth = len(folder.relative_to(tree).parts)
        key = (-(len(expected) - len(missing_entries(folder, expected))), depth, str(folder))
        if best_key is None or key < best_key:
            best, best_key = folder, key
    return best


def _open_maybe_gz(path: Path) -> BinaryIO:
    """Open ``path`` for binary reading, transparently decompressing ``.gz``."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _count_lines(path: Path) -> int:
    """Number of lines, counting a final line without newline."""
    count, last = 0, b"\n"
    with _open_maybe_gz(path) as fh:
        while chunk := fh.read(CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def verify(source: DatasetSource, folder: Path) -> None:
    """Check presence, hashes, header shape and row counts of the staged files.

    Raises:
        DataError: listing every problem, each with the file it concerns.
    """
    absent = missing_entries(folder, source.expected_files)
    problems = [f"{rel}: missing from the archive" for rel in absent]
    for rel, want in sorted(source.sha256.items()):
        path = folder / rel
        if not path.is_file():
            if rel not in absent:  # hashed but not listed as expected: still report it once
                problems.append(f"{rel}: missing from the archive")
            continue
        got = _sha256(path)
        if got != want.lower():
            problems.append(f"{rel}: sha256 mismatch (expected {want.lower()}, got {got})")
    for rel, n_cols in sorted((source.header_check or {}).items()):
        path = folder / rel
        if not path.is_file():
            continue  # already reported as missing
        try:
            with _open_maybe_gz(path) as fh:
                first = fh.readline().rstrip(b"\r\n")
        except (OSError, EOFError) as exc:
            problems.append(f"{rel}: unreadable ({exc})")
            continue
        got_cols = len(first.split(b"\t")) if first else 0
        if got_cols != n_cols:
            problems.append(f"{rel}: first line has {got_cols} tab-separated columns, expected {n_cols}")
    for rel, n_min in sorted((source.min_rows or {}).items()):
        path = folder / rel
        if not path.is_file():
            continue
        try:
            n = _count_lines(path)
        except (OSError, EOFError) as exc:
            problems.append(f"{rel}: unreadable ({exc})")
            continue
        if n < n_min:
            problems.append(f"{rel}: only {n} lines, expected at least {n_min} (truncated?)")
    if problems:
        raise DataError(
            f"Dataset '{source.name}': the download from {source.url} failed verification; "
            "nothing was installed.\n  " + "\n  ".join(problems)
        )


def install(found: Path, root: Path) -> None:
    """Move the verified folder into place without overwriting anything that already exists."""
    if not root.exists():
        try:
            os.replace(found, root)  # atomic: readers see either nothing or the complete folder
            return
        except OSError:
            if not root.exists():
                raise
            # Another process created root meanwhile: fall through and merge instead.
    for entry in sorted(found.iterdir()):
        target = root / entry.name
        if not target.exists() and not target.is_symlink():
            os.replace(entry, target)


def missing_entries(root: Path, expected: Iterable[str]) -> list[str]:
    """Expected entries absent under ``root`` (a trailing ``/`` requires a folder)."""
    out = []
    for rel in expected:
        path = root / rel
        present = path.is_dir() if rel.endswith("/") else path.is_file()
        if not present:
            out.append(rel)
    return out


def archive_kind(url: str) -> str:
    """Archive type from the URL path: ``zip``, ``tar``, ``gz`` or ``file``."""
    path = urllib.parse.urlparse(url).path.lower()
    if path.endswith(".zip"):
        return "zip"
    if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")):
        return "tar"
    if path.endswith(".gz"):
        return "gz"
    return "file"
