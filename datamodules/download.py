"""Find a dataset on disk or fetch, verify and install it.

A dataset is described by a :class:`DatasetSource`: where its archive lives and which files must
exist afterwards (with their sha256 where it is known, else cheap plausibility checks). The public
entry point :func:`ensure_dataset` is all-or-nothing: it either leaves a folder holding every
expected, verified file, or raises :class:`DataError` and leaves the disk as it found it. Partial
downloads never masquerade as data because everything is staged in temporary paths next to the
target folder and only moved into place (``os.replace``, atomic on one filesystem) once verified.

Archives are extracted member by member with path checks (datamodules/archives.py), so a hostile or
broken archive cannot write outside the staging folder (zip-slip, absolute paths, escaping links).
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from datamodules.archives import CHUNK, DatasetSource, archive_kind, extract, install, locate, missing_entries, verify
from datamodules.artifacts import temp_path
from datamodules.errors import DataError

__all__ = ["DatasetSource", "SOURCES", "ensure_dataset"]

_USER_AGENT = "qtmob-repro-downloader/1.0 (+python urllib)"


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
    missing = missing_entries(root, source.expected_files)
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
        extract(source, tmp_file, tree)
        # Free the archive's disk space before the (possibly large) verification step.
        tmp_file.unlink()
        tmp_file = None
        found = locate(tree, source.expected_files)
        verify(source, found)
        install(found, root)
        still_missing = missing_entries(root, source.expected_files)
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


def _manual_hint(source: DatasetSource, root: Path) -> str:
    """How to install ``source`` by hand into ``root`` (used in every error that may need it)."""
    where = root.absolute()
    files = ", ".join(source.expected_files)
    kind = archive_kind(source.url)
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
                while chunk := response.read(CHUNK):
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
