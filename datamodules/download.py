"""Find a dataset on disk or fetch, verify and install it.

A dataset is described by a :class:`DatasetSource`: where its archive lives and which files must
exist afterwards (with their sha256 where it is known, else cheap plausibility checks). The public
entry point :func:`ensure_dataset` is all-or-nothing: it either leaves a folder holding every
expected, verified file, or raises :class:`DataError` and leaves the disk as it found it. Partial
downloads never masquerade as data because everything is staged in temporary paths next to the
target folder and only moved into place (``os.replace``, atomic on one filesystem) once verified.

Archives are extracted member by member with path checks, so a hostile or broken archive cannot
write outside the staging folder (zip-slip, absolute paths, escaping links).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import posixpath
import re
import shutil
import socket
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from datamodules.artifacts import temp_path
from datamodules.errors import DataError

__all__ = ["DatasetSource", "SOURCES", "ensure_dataset"]

_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a responsive progress bar.
_USER_AGENT = "qtmob-repro-downloader/1.0 (+python urllib)"
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


_TSMC_URL = "http://www-public.imtbs-tsp.eu/~zhang_dq/pub/dataset_tsmc2014.zip"

SOURCES: dict[str, DatasetSource] = {
    "qtmob_nyc": DatasetSource(
        name="qtmob_nyc",
        url="https://github.com/shadowfall09/QT-Mob/raw/main/data/foursquare_NYC.zip",
        expected_files=(
            "trips_train.csv",
            "trips_valid.csv",
            "trips_test.csv",
            "loc2id",
            "user_profile.csv",
            "user_index.json",
            "index_Llama-3.2-1B-Instruct.json",
            "prompts/",
        ),
        sha256={
            "trips_train.csv": "b732f40dc44472139ddff999fb03f3e4f79729b3fc0c6e5a9aa64f11dcdf2b8b",
            "trips_valid.csv": "1280da635f42a5077e50078ef3d8c97cbe658bfe2639b272d85428937115cd20",
            "trips_test.csv": "db56edf904fac17e5ac2c9496b66af9f57f6c5ef0f2b565e9de45b2c6f88d40b",
            "loc2id": "ee11b394f8d1ced7fc476b6af8bafc63ff6f1b932fe07eaa805db86591710184",
            "index_Llama-3.2-1B-Instruct.json": "7d7d1c02ec23d3f0d17d3bf0e81db8a93bcb5d311b5d52768db31c454811ee76",
            "user_index.json": "9fbecac9ceefde6c0f28af959e8cd38042b6f8981f39b97d43e9c1a493bc3d08",
            "user_profile.csv": "5d477cffecfc4deb8740942a91380ce780860fb63301eae2cb65c0af65acd721",
        },
    ),
    # One zip holds both cities; no published hashes, so check shape and size instead.
    "tsmc_nyc": DatasetSource(
        name="tsmc_nyc",
        url=_TSMC_URL,
        expected_files=("dataset_TSMC2014_NYC.txt",),
        sha256={},
        header_check={"dataset_TSMC2014_NYC.txt": 8},
        min_rows={"dataset_TSMC2014_NYC.txt": 227_428},
    ),
    "tsmc_tky": DatasetSource(
        name="tsmc_tky",
        url=_TSMC_URL,
        expected_files=("dataset_TSMC2014_TKY.txt",),
        sha256={},
        header_check={"dataset_TSMC2014_TKY.txt": 8},
        min_rows={"dataset_TSMC2014_TKY.txt": 573_703},
    ),
    # Kept gzipped: the reader streams the .gz, and unpacking would triple the disk footprint.
    "gowalla_ca": DatasetSource(
        name="gowalla_ca",
        url="https://snap.stanford.edu/data/loc-gowalla_totalCheckins.txt.gz",
        expected_files=("loc-gowalla_totalCheckins.txt.gz",),
        sha256={},
        header_check={"loc-gowalla_totalCheckins.txt.gz": 5},
        min_rows={"loc-gowalla_totalCheckins.txt.gz": 6_442_890},
    ),
}


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def ensure_dataset(source: DatasetSource, root: str | Path, download: bool, timeout: float = 60.0) -> Path:
    """Return ``root`` once it holds every expected file of ``source``, downloading if allowed.

    Args:
        source: The dataset description (see :data:`SOURCES`; override fields with
            ``dataclasses.replace``).
        root: Folder in which the expected files must lie directly.
        download: Whether fetching from ``source.url`` is allowed when files are missing.
        timeout: Socket timeout in seconds for connecting and for each read.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: when files are missing and ``download`` is false, when the download fails
            (network, HTTP error, truncation), or when the archive is unsafe, malformed or does
            not contain correct copies of the expected files. Nothing is left behind then.
    """
    root = Path(root).expanduser()
    missing = _missing(root, source.expected_files)
    if not missing:
        # Already installed: no network, no re-hashing (the readers validate content anyway).
        return root
    if not download:
        raise DataError(
            f"Dataset '{source.name}' is not available: missing under {root.absolute()}: "
            f"{', '.join(missing)}.\n{_manual_hint(source, root)}\n"
            "Or set data.download=true to fetch it automatically."
        )

    parent = root.absolute().parent
    created = _make_dirs(parent)
    tmp_file: Path | None = None
    tmp_dir: Path | None = None
    success = False
    try:
        # Staging next to root keeps everything on one filesystem, so the final os.replace is
        # atomic, and a crash leaves only dot-prefixed temp names that are obviously not data.
        tmp_file = temp_path(parent / f"{root.name}.download")
        digest = _download(source, tmp_file, root, timeout)
        if source.archive_sha256 and digest != source.archive_sha256.lower():
            raise DataError(
                f"Dataset '{source.name}': the archive downloaded from {source.url} has sha256 "
                f"{digest}, expected {source.archive_sha256.lower()} (corrupted or changed upstream)."
            )
        tmp_dir = temp_path(parent / f"{root.name}.extract")
        tmp_dir.mkdir()
        tree = tmp_dir / "tree"
        tree.mkdir()
        _extract(source, tmp_file, tree)
        # Free the archive's disk space before the (possibly large) verification step.
        tmp_file.unlink()
        tmp_file = None
        found = _locate(tree, source.expected_files)
        _verify(source, found)
        _install(found, root)
        still_missing = _missing(root, source.expected_files)
        if still_missing:
            # Only possible when root existed with a partial entry we refused to overwrite.
            raise DataError(
                f"Dataset '{source.name}': {root.absolute()} already existed and still lacks "
                f"{', '.join(still_missing)} after installing the download; existing entries are never "
                "overwritten. Move the incomplete entries away and run again."
            )
        success = True
    except DataError:
        raise
    except OSError as exc:
        # Disk full, permission denied, ...: a user-fixable condition, not a programming error.
        raise DataError(f"Dataset '{source.name}': could not prepare {root.absolute()}: {exc}") from exc
    finally:
        # Runs on success, DataError, KeyboardInterrupt and anything else alike.
        if tmp_file is not None:
            tmp_file.unlink(missing_ok=True)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if not success:
            _remove_empty(created)
    return root


# ----------------------------------------------------------------------------------------------
# Messages and small filesystem helpers
# ----------------------------------------------------------------------------------------------


def _missing(root: Path, expected: Iterable[str]) -> list[str]:
    """Expected entries absent under ``root`` (a trailing ``/`` requires a folder)."""
    out = []
    for rel in expected:
        path = root / rel
        present = path.is_dir() if rel.endswith("/") else path.is_file()
        if not present:
            out.append(rel)
    return out


def _archive_kind(url: str) -> str:
    """Archive type from the URL path: ``zip``, ``tar``, ``gz`` or ``file``."""
    path = urllib.parse.urlparse(url).path.lower()
    if path.endswith(".zip"):
        return "zip"
    if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")):
        return "tar"
    if path.endswith(".gz"):
        return "gz"
    return "file"


def _manual_hint(source: DatasetSource, root: Path) -> str:
    """How to install ``source`` by hand into ``root`` (used in every error that may need it)."""
    where = root.absolute()
    files = ", ".join(source.expected_files)
    kind = _archive_kind(source.url)
    if kind == "gz" and all(f.endswith(".gz") for f in source.expected_files):
        how = f"save it unchanged (do not decompress) as {where / source.expected_files[0]}"
    elif kind == "file":
        how = f"save it into {where}/ so that {files} end up directly there"
    else:
        how = (
            f"unpack it so that {files} end up directly in {where}/ "
            "(if the archive has a top-level folder, move that folder's contents up)"
        )
    return f"To install it by hand, fetch\n  {source.url}\non a machine with internet access and {how}."


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and missing ancestors; return those created, deepest first."""
    created: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    """Remove folders this module created, if still empty (failure must leave no trace)."""
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or already gone: leave it


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def _download(source: DatasetSource, dest: Path, root: Path, timeout: float) -> str:
    """Stream ``source.url`` into ``dest`` with a progress bar; return the sha256 of the bytes.

    Raises:
        DataError: on any network or HTTP failure, or when fewer bytes arrive than announced.
    """
    request = urllib.request.Request(source.url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    received = 0
    total: int | None = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"download {source.name}", mininterval=0.5, leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()  # the error carries an open response body
        raise _network_error(source, root, f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _network_error(source, root, str(exc.reason)) from None
    except (TimeoutError, socket.timeout) as exc:
        raise _network_error(source, root, f"timed out after {timeout:g}s ({exc or 'no data'})") from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _network_error(source, root, f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:  # malformed URL / unknown scheme
        raise DataError(f"Dataset '{source.name}': invalid download URL {source.url!r}: {exc}") from None
    if total is not None and received != total:
        # http.client does not flag a short body by itself; a truncated archive must not pass.
        raise _network_error(source, root, f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _network_error(source: DatasetSource, root: Path, reason: str) -> DataError:
    """The user-facing error for a failed download."""
    return DataError(
        f"Dataset '{source.name}': downloading {source.url} failed: {reason}.\n"
        "This machine may be offline, or the server may be unreachable or have moved the file.\n"
        f"{_manual_hint(source, root)}"
    )


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------


def _extract(source: DatasetSource, archive: Path, tree: Path) -> None:
    """Unpack (or copy) the downloaded payload into the empty folder ``tree``.

    Raises:
        DataError: if the payload is not of the type its URL promises, is corrupt, or is unsafe.
    """
    kind = _archive_kind(source.url)
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
                shutil.copyfileobj(src, out, _CHUNK)


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
            shutil.copyfileobj(src, out, _CHUNK)


# ----------------------------------------------------------------------------------------------
# Locate, verify, install
# ----------------------------------------------------------------------------------------------


def _locate(tree: Path, expected: tuple[str, ...]) -> Path:
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
        key = (-(len(expected) - len(_missing(folder, expected))), depth, str(folder))
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
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _count_lines(path: Path) -> int:
    """Number of lines, counting a final line without newline."""
    count, last = 0, b"\n"
    with _open_maybe_gz(path) as fh:
        while chunk := fh.read(_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _verify(source: DatasetSource, folder: Path) -> None:
    """Check presence, hashes, header shape and row counts of the staged files.

    Raises:
        DataError: listing every problem, each with the file it concerns.
    """
    absent = _missing(folder, source.expected_files)
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


def _install(found: Path, root: Path) -> None:
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
