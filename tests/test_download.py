"""Tests for :mod:`datamodules.download`, fully offline.

A ``ThreadingHTTPServer`` on 127.0.0.1 serves small archives that each test builds itself, so the
real download, extraction, verification and cleanup paths run without touching the internet.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamodules import download as dl
from datamodules.download import SOURCES, DatasetSource, ensure_dataset
from datamodules.errors import DataError

# Small stand-ins for the QT-Mob release files.
FAKE_FILES: dict[str, bytes] = {
    "trips_train.csv": b"user_id,trips,traj_id\n1,\"['-73.9,40.7,2012-04-03 18:00:09']\",0\n",
    "trips_valid.csv": b"user_id,trips,traj_id\n",
    "trips_test.csv": b"user_id,trips,traj_id\n",
    "loc2id": b"\x80\x04}\x94.",
    "user_profile.csv": b"user_id|profile\n1|likes coffee\n",
    "user_index.json": b"{}",
    "prompts/0.txt": b"The name of this location is \"X\".\n",
}
EXPECTED = ("trips_train.csv", "trips_valid.csv", "trips_test.csv", "loc2id", "user_profile.csv",
            "user_index.json", "prompts/")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAKE_SHA = {k: sha(v) for k, v in FAKE_FILES.items() if "/" not in k}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean


class _Server:
    """A local file server; ``url(name)`` points at ``directory / name``."""

    def __init__(self, directory: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None):
        self.directory = directory
        factory = handler or functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
        # A short poll interval makes shutdown() in teardown return quickly.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours *_proxy variables; a proxy on the test machine must not intercept 127.0.0.1.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    served = tmp_path / "served"
    served.mkdir()
    srv = _Server(served)
    yield srv
    srv.stop()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # The parent "data" does not exist yet: ensure_dataset must create it (and remove it on failure).
    return tmp_path / "data" / "qtmob_nyc"


def dead_port() -> int:
    """A port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


def release_zip(path: Path, files: dict[str, bytes] = FAKE_FILES) -> Path:
    """Zip laid out like the real release: top-level folder plus macOS junk."""
    entries = {f"foursquare_NYC/{k}": v for k, v in files.items()}
    entries["__MACOSX/foursquare_NYC/._trips_train.csv"] = b"junk"
    return make_zip(path, entries)


def source_for(url: str, **kw: object) -> DatasetSource:
    base = DatasetSource(name="qtmob_nyc", url=url, expected_files=EXPECTED, sha256=dict(FAKE_SHA))
    return dataclasses.replace(base, **kw)


def assert_no_leftovers(root: Path) -> None:
    """Failure leaves nothing: no root and no temp files (the created parent is gone too)."""
    assert not root.exists()
    parent = root.parent
    assert not parent.exists() or list(parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Built-in sources
# ---------------------------------------------------------------------------------------------


def test_builtin_sources_list_expected_files() -> None:
    nyc = SOURCES["qtmob_nyc"]
    assert set(nyc.expected_files) >= {
        "trips_train.csv", "trips_valid.csv", "trips_test.csv", "loc2id", "user_profile.csv",
        "user_index.json", "index_Llama-3.2-1B-Instruct.json", "prompts/",
    }
    assert set(nyc.sha256) <= set(nyc.expected_files)
    assert all(len(h) == 64 for h in nyc.sha256.values())
    assert SOURCES["tsmc_nyc"].expected_files == ("dataset_TSMC2014_NYC.txt",)
    assert SOURCES["tsmc_tky"].expected_files == ("dataset_TSMC2014_TKY.txt",)
    assert SOURCES["tsmc_nyc"].url == SOURCES["tsmc_tky"].url
    assert SOURCES["tsmc_nyc"].header_check == {"dataset_TSMC2014_NYC.txt": 8}
    assert SOURCES["tsmc_tky"].min_rows == {"dataset_TSMC2014_TKY.txt": 573_703}
    gw = SOURCES["gowalla_ca"]
    assert gw.expected_files == ("loc-gowalla_totalCheckins.txt.gz",)
    assert gw.header_check == {"loc-gowalla_totalCheckins.txt.gz": 5}
    for name, src in SOURCES.items():
        assert src.name == name
        assert set(src.header_check or {}) <= set(src.expected_files)
        assert set(src.min_rows or {}) <= set(src.expected_files)


# ---------------------------------------------------------------------------------------------
# Successful downloads
# ---------------------------------------------------------------------------------------------


def test_zip_success(server: _Server, root: Path) -> None:
    release_zip(server.directory / "foursquare_NYC.zip")
    src = source_for(server.url("foursquare_NYC.zip"))
    src = dataclasses.replace(src, archive_sha256=sha((server.directory / "foursquare_NYC.zip").read_bytes()))
    assert ensure_dataset(src, root, download=True, timeout=5) == root
    for rel, data in FAKE_FILES.items():
        assert (root / rel).read_bytes() == data
    assert not (root / "__MACOSX").exists()
    assert not (root / "foursquare_NYC").exists()  # the top-level folder was stripped
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temp files left over
    # Second call: present, no network needed even with a dead URL.
    dead = dataclasses.replace(src, url=f"http://127.0.0.1:{dead_port()}/x.zip")
    assert ensure_dataset(dead, root, download=True, timeout=5) == root


def test_tar_gz_success(server: _Server, tmp_path: Path) -> None:
    make_tar(server.directory / "d.tar.gz", {f"top/{k}": v for k, v in FAKE_FILES.items()})
    root = tmp_path / "r"
    ensure_dataset(source_for(server.url("d.tar.gz")), root, download=True, timeout=5)
    assert (root / "loc2id").read_bytes() == FAKE_FILES["loc2id"]
    assert (root / "prompts" / "0.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "served"]


def test_gz_kept_compressed_with_header_and_rows(server: _Server, tmp_path: Path) -> None:
    body = b"".join(b"1\t2010-10-19T23:55:27Z\t30.2\t-97.7\t22847\n" for _ in range(10))
    (server.directory / "checkins.txt.gz").write_bytes(gzip.compress(body))
    src = DatasetSource(
        name="gw", url=server.url("checkins.txt.gz"), expected_files=("checkins.txt.gz",), sha256={},
        header_check={"checkins.txt.gz": 5}, min_rows={"checkins.txt.gz": 10},
    )
    root = tmp_path / "gw"
    ensure_dataset(src, root, download=True, timeout=5)
    assert gzip.decompress((root / "checkins.txt.gz").read_bytes()) == body


def test_gz_gunzipped_when_expected_plain(server: _Server, tmp_path: Path) -> None:
    body = b"a\tb\n"
    (server.directory / "f.txt.gz").write_bytes(gzip.compress(body))
    src = DatasetSource(name="f", url=server.url("f.txt.gz"), expected_files=("f.txt",), sha256={"f.txt": sha(body)})
    ensure_dataset(src, tmp_path / "f", download=True, timeout=5)
    assert (tmp_path / "f" / "f.txt").read_bytes() == body


def test_plain_file_copied(server: _Server, tmp_path: Path) -> None:
    (server.directory / "plain.txt").write_bytes(b"x\ty\n")
    src = DatasetSource(name="p", url=server.url("plain.txt"), expected_files=("plain.txt",), sha256={})
    ensure_dataset(src, tmp_path / "p", download=True, timeout=5)
    assert (tmp_path / "p" / "plain.txt").read_bytes() == b"x\ty\n"


def test_partially_populated_root_is_completed(server: _Server, root: Path) -> None:
    release_zip(server.directory / "a.zip")
    root.mkdir(parents=True)
    (root / "trips_train.csv").write_bytes(FAKE_FILES["trips_train.csv"])
    (root / "notes.txt").write_text("mine")
    ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert (root / "user_index.json").read_bytes() == FAKE_FILES["user_index.json"]
    assert (root / "notes.txt").read_text() == "mine"  # user files untouched
    assert sorted(p.name for p in root.parent.iterdir()) == [root.name]


# ---------------------------------------------------------------------------------------------
# Verification failures
# ---------------------------------------------------------------------------------------------


def test_sha_mismatch(server: _Server, root: Path) -> None:
    bad = dict(FAKE_FILES, loc2id=b"tampered")
    release_zip(server.directory / "a.zip", bad)
    with pytest.raises(DataError, match=r"loc2id: sha256 mismatch"):
        ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert_no_leftovers(root)


def test_archive_sha_mismatch(server: _Server, root: Path) -> None:
    release_zip(server.directory / "a.zip")
    src = source_for(server.url("a.zip"), archive_sha256="0" * 64)
    with pytest.raises(DataError, match="sha256"):
        ensure_dataset(src, root, download=True, timeout=5)
    assert_no_leftovers(root)


def test_missing_expected_file(server: _Server, root: Path) -> None:
    files = {k: v for k, v in FAKE_FILES.items() if k != "user_index.json"}
    release_zip(server.directory / "a.zip", files)
    with pytest.raises(DataError, match=r"user_index.json: missing"):
        ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert_no_leftovers(root)


def test_header_and_min_rows_checks(server: _Server, tmp_path: Path) -> None:
    make_zip(server.directory / "t.zip", {"dataset_tsmc2014/d.txt": b"a\tb\tc\n", "dataset_tsmc2014/readme.txt": b"hi"})
    src = DatasetSource(
        name="t", url=server.url("t.zip"), expected_files=("d.txt",), sha256={},
        header_check={"d.txt": 8}, min_rows={"d.txt": 5},
    )
    with pytest.raises(DataError) as err:
        ensure_dataset(src, tmp_path / "t", download=True, timeout=5)
    assert "d.txt: first line has 3 tab-separated columns, expected 8" in str(err.value)
    assert "d.txt: only 1 lines" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_not_a_zip(server: _Server, root: Path) -> None:
    (server.directory / "a.zip").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match="not a zip archive"):
        ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert_no_leftovers(root)


# ---------------------------------------------------------------------------------------------
# Unsafe archives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["../evil.txt", "../../../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_zip_slip_refused(server: _Server, tmp_path: Path, member: str) -> None:
    entries = {f"foursquare_NYC/{k}": v for k, v in FAKE_FILES.items()}
    entries[member] = b"pwned"
    make_zip(server.directory / "a.zip", entries)
    root = tmp_path / "data" / "qtmob_nyc"
    with pytest.raises(DataError, match="unsafe"):
        ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert_no_leftovers(root)
    assert not [p for p in tmp_path.rglob("evil.txt")]
    assert not Path("/tmp/evil.txt").exists() or Path("/tmp/evil.txt").read_bytes() != b"pwned"


@pytest.mark.parametrize(
    ("entries", "links"),
    [
        ({"top/loc2id": b"x", "../evil.txt": b"pwned"}, None),
        ({"top/loc2id": b"x"}, {"top/escape": "../../../etc/passwd"}),
        ({"top/loc2id": b"x"}, {"top/abs": "/etc/passwd"}),
    ],
)
def test_tar_slip_refused(server: _Server, tmp_path: Path, entries: dict[str, bytes], links: dict[str, str] | None) -> None:
    make_tar(server.directory / "a.tar.gz", entries, links)
    root = tmp_path / "data" / "x"
    src = DatasetSource(name="x", url=server.url("a.tar.gz"), expected_files=("loc2id",), sha256={})
    with pytest.raises(DataError, match="unsafe"):
        ensure_dataset(src, root, download=True, timeout=5)
    assert_no_leftovers(root)
    assert not [p for p in tmp_path.rglob("evil.txt")]


# ---------------------------------------------------------------------------------------------
# Network failures
# ---------------------------------------------------------------------------------------------


def test_http_404(server: _Server, root: Path) -> None:
    with pytest.raises(DataError, match="404") as err:
        ensure_dataset(source_for(server.url("nope.zip")), root, download=True, timeout=5)
    assert server.url("nope.zip") in str(err.value)
    assert_no_leftovers(root)


def test_connection_refused_mentions_offline(root: Path) -> None:
    url = f"http://127.0.0.1:{dead_port()}/a.zip"
    with pytest.raises(DataError) as err:
        ensure_dataset(source_for(url), root, download=True, timeout=5)
    msg = str(err.value)
    assert "offline" in msg and url in msg and str(root.absolute()) in msg
    assert_no_leftovers(root)


def test_timeout(root: Path) -> None:
    # A socket that accepts connections at TCP level but never answers.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/a.zip"
        with pytest.raises(DataError, match="offline"):
            ensure_dataset(source_for(url), root, download=True, timeout=0.3)
    assert_no_leftovers(root)


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 only a little")
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_truncated_download(tmp_path: Path) -> None:
    srv = _Server(tmp_path, handler=_TruncatingHandler)
    try:
        root = tmp_path / "data" / "x"
        with pytest.raises(DataError, match="of 1000 bytes"):
            ensure_dataset(source_for(srv.url("a.zip")), root, download=True, timeout=5)
        assert_no_leftovers(root)
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# No download / already present / interruption
# ---------------------------------------------------------------------------------------------


def test_absent_without_download(root: Path) -> None:
    src = SOURCES["qtmob_nyc"]
    with pytest.raises(DataError) as err:
        ensure_dataset(src, root, download=False)
    msg = str(err.value)
    assert str(root.absolute()) in msg
    assert src.url in msg
    assert "data.download=true" in msg
    assert "trips_train.csv" in msg
    assert not root.parent.exists()  # nothing created


def test_existing_root_uses_no_network(tmp_path: Path) -> None:
    root = tmp_path / "qtmob_nyc"
    for rel, data in FAKE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    src = source_for(f"http://127.0.0.1:{dead_port()}/a.zip")
    assert ensure_dataset(src, root, download=True, timeout=1) == root
    assert ensure_dataset(src, str(root), download=False) == root


def test_interrupt_cleans_up(server: _Server, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release_zip(server.directory / "a.zip")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "verify", interrupted)  # the step after extraction, as download.py calls it
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(source_for(server.url("a.zip")), root, download=True, timeout=5)
    assert_no_leftovers(root)
