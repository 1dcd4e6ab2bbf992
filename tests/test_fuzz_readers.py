"""Property-based fuzzing of the readers: TSMC2014, SNAP Gowalla and the QT-Mob release.

Hypothesis writes files made of valid rows and rows broken in the ways real downloads are broken
(wrong column counts, unparsable times, out-of-range coordinates, empty ids, NUL bytes, invalid
UTF-8, a truncated last line, garbage lines, empty or missing files). The properties:

* a reader either returns a canonical frame or raises :class:`DataError` naming the file, never
  any other exception;
* when it returns, good rows + quarantined rows == data rows of the input, every quarantined row has
  its file, 1-based line and a reason, every row known to be bad is quarantined and no row known
  to be good is;
* with ``max_bad_fraction=1.0`` it never raises for a non-empty file; with the default 1 % and
  many bad rows it raises a DataError naming the file and listing the first bad lines.
"""

from __future__ import annotations

import gzip
import pickle
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from datamodules.errors import DataError, Quarantine
from datamodules.readers.qtmob_release import read_qtmob_release
from datamodules.readers.raw_formats import read_gowalla, read_tsmc
from datamodules.schema import CHECKIN_SCHEMA

FUZZ = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
#: The release reader takes ~30 ms per example: report only the first bug found, shrunk but not
#: "explained" (the explain phase reruns many examples), so that a failure stays quick.
FUZZ_RELEASE = settings(
    FUZZ, report_multiple_bugs=False,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)

GOOD, BAD, UNKNOWN, BLANK = "good", "bad", "unknown", "blank"
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3("]
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass
class Line:
    """One physical line of a generated file (without its line ending) and what it should become."""

    data: bytes
    status: str  # GOOD: must be read; BAD: must be quarantined; UNKNOWN: either; BLANK: no data row


@dataclass
class RawFile:
    lines: list[Line]
    ending: str  # "newline" | "none" (last line unterminated) | "truncated" (last line cut short)
    crlf: bool

    def render(self) -> bytes:
        eol = b"\r\n" if self.crlf else b"\n"
        body = eol.join(line.data for line in self.lines)
        return body + (eol if self.lines and self.ending == "newline" else b"")

    def data_lines(self) -> list[int]:
        """1-based numbers of the lines the reader must count as data rows (non-blank)."""
        return [i for i, line in enumerate(self.lines, 1) if line.data.strip(b" \t")]

    def numbers(self, status: str) -> set[int]:
        return {i for i, line in enumerate(self.lines, 1) if line.status == status and line.data.strip(b" \t")}


# ---- strategies -----------------------------------------------------------------------------------


def tsmc_time(t: datetime) -> str:
    return f"{DAYS[t.weekday()]} {MONTHS[t.month - 1]} {t.day:02d} {t:%H:%M:%S} +0000 {t.year}"


def _insert(draw, value: bytes, piece: bytes) -> bytes:
    at = draw(st.integers(0, len(value)))
    return value[:at] + piece + value[at:]


garbage = st.text(
    alphabet=st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=60
).map(lambda s: b"#" + s.encode("utf-8"))
blank = st.sampled_from([b"", b" ", b"\t", b"  \t "])
lat_outside = st.one_of(
    st.floats(min_value=90, exclude_min=True), st.floats(max_value=-90, exclude_max=True),
    st.sampled_from([float("nan")]),
).map(repr)
lon_outside = st.one_of(
    st.floats(min_value=180, exclude_min=True), st.floats(max_value=-180, exclude_max=True),
    st.sampled_from([float("nan")]),
).map(repr)
empty_id = st.sampled_from(["", " ", "  "])
when = st.datetimes(min_value=datetime(2010, 1, 1), max_value=datetime(2013, 12, 31))


@st.composite
def tsmc_line(draw) -> Line:
    enc = draw(st.sampled_from(["utf-8", "latin-1"]))
    fields = [
        str(draw(st.integers(1, 1083))),
        draw(st.text("0123456789abcdef", min_size=24, max_size=24)),
        draw(st.text("0123456789abcdef", min_size=24, max_size=24)),
        draw(st.sampled_from(["Bar", "Café", "Home (private)", "Subway", "Ramen / Noodle House", ""])),
        repr(draw(st.floats(-90, 90))),
        repr(draw(st.floats(-180, 180))),
        str(draw(st.integers(-14 * 60, 14 * 60))),
        tsmc_time(draw(when)),
    ]
    kind = draw(st.sampled_from([
        "good", "good", "good", "extra_field", "missing_field", "bad_time", "bad_lat", "bad_lon",
        "empty_user", "empty_venue", "bad_offset", "nul", "invalid_utf8", "garbage", "blank",
    ]))
    status = BAD
    if kind == "good":
        status = GOOD
    elif kind == "extra_field":
        fields.append(draw(st.text("abc123 ", max_size=5)))
    elif kind == "missing_field":
        del fields[draw(st.integers(0, 7))]
    elif kind == "bad_time":
        fields[7] = draw(st.sampled_from([
            "Tue Apr 33 18:00:09 +0000 2012", "Tue Apr 03 25:00:09 +0000 2012", "2012-04-03 18:00:09",
            "Tue Foo 03 18:00:09 +0000 2012", "yesterday", "", "Tue Apr 03 18:00:09 +0000",
        ]))
    elif kind == "bad_lat":
        fields[4] = draw(lat_outside)
    elif kind == "bad_lon":
        fields[5] = draw(lon_outside)
    elif kind == "empty_user":
        fields[0] = draw(empty_id)
    elif kind == "empty_venue":
        fields[1] = draw(empty_id)
    elif kind == "bad_offset":
        fields[6] = draw(st.sampled_from(["-241.5", "abc", "", "900", "-841"]))
    if kind == "garbage":
        return Line(draw(garbage), UNKNOWN)
    if kind == "blank":
        return Line(draw(blank), BLANK)
    parts = [f.encode(enc) for f in fields]
    if kind == "nul":
        i = draw(st.integers(0, 7))
        parts[i] = _insert(draw, parts[i], b"\x00")
    elif kind == "invalid_utf8":
        # In a file read as Latin-1 a stray byte only breaks the numeric and time fields; in a file
        # read as UTF-8 the whole line is quarantined (tsmc_encoding_oracle decides which).
        i = draw(st.integers(0, 7))
        parts[i] = _insert(draw, parts[i], draw(st.sampled_from(INVALID_UTF8)))
        status = BAD if i >= 4 else GOOD
    return Line(b"\t".join(parts), status)


@st.composite
def gowalla_line(draw) -> Line:
    fields = [
        str(draw(st.integers(0, 196590))),
        f"{draw(when):%Y-%m-%dT%H:%M:%SZ}",
        repr(draw(st.floats(-90, 90))),
        repr(draw(st.floats(-180, 180))),
        str(draw(st.integers(0, 6_000_000))),
    ]
    kind = draw(st.sampled_from([
        "good", "good", "good", "extra_field", "missing_field", "bad_time", "bad_lat", "bad_lon",
        "empty_user", "empty_location", "nul", "invalid_utf8", "garbage", "blank",
    ]))
    status = BAD
    if kind == "good":
        status = GOOD
    elif kind == "extra_field":
        fields.append(draw(st.text("abc123 ", max_size=5)))
    elif kind == "missing_field":
        del fields[draw(st.integers(0, 4))]
    elif kind == "bad_time":
        fields[1] = draw(st.sampled_from([
            "2010-10-19 23:55:27", "2010-13-19T23:55:27Z", "2010-10-19T24:55:27Z", "19/10/2010", "", "T",
        ]))
    elif kind == "bad_lat":
        fields[2] = draw(lat_outside)
    elif kind == "bad_lon":
        fields[3] = draw(lon_outside)
    elif kind == "empty_user":
        fields[0] = draw(empty_id)
    elif kind == "empty_location":
        fields[4] = draw(empty_id)
    if kind == "garbage":
        return Line(draw(garbage), UNKNOWN)
    if kind == "blank":
        return Line(draw(blank), BLANK)
    parts = [f.encode() for f in fields]
    if kind in ("nul", "invalid_utf8"):
        i = draw(st.integers(0, len(parts) - 1))
        piece = b"\x00" if kind == "nul" else draw(st.sampled_from(INVALID_UTF8))
        parts[i] = _insert(draw, parts[i], piece)
    return Line(b"\t".join(parts), status)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def tsmc_encoding_oracle(f: RawFile) -> RawFile:
    """What the reader must do with encodings, stated independently of it: a file that decodes as UTF-8
    is UTF-8; a file whose non-ASCII lines all fail UTF-8 is Latin-1 (statuses as drawn); any other file
    is UTF-8 with its undecodable lines quarantined (reason "encoding")."""
    non_ascii = [line for line in f.lines if not line.data.isascii()]
    if _utf8(f.render()) or all(not _utf8(line.data) for line in non_ascii):
        return f
    lines = [Line(line.data, BAD) if line.status == GOOD and not _utf8(line.data) else line for line in f.lines]
    return RawFile(lines, f.ending, f.crlf)


@st.composite
def raw_file(draw, line_strategy) -> RawFile:
    lines = draw(st.lists(line_strategy, min_size=0, max_size=30))
    ending = draw(st.sampled_from(["newline", "newline", "none", "truncated"]))
    if ending == "truncated" and lines and len(lines[-1].data) > 1:
        last = lines[-1].data
        lines[-1] = Line(last[: draw(st.integers(1, len(last) - 1))], UNKNOWN)
    return RawFile(lines, ending, crlf=draw(st.booleans()))


# ---- shared checks --------------------------------------------------------------------------------


def assert_canonical(df: pl.DataFrame) -> None:
    assert dict(df.schema) == CHECKIN_SCHEMA
    for col in ("user_id", "poi_id"):
        assert df[col].null_count() == 0, col
        assert not (df[col].str.strip_chars() == "").any(), f"empty {col}"
        assert not df[col].str.contains("\x00", literal=True).any(), f"NUL byte in {col}"
    for col in ("utc_time", "local_time", "lat", "lon"):
        assert df[col].null_count() == 0, f"null {col}"
    assert df["lat"].is_between(-90, 90).all() and df["lon"].is_between(-180, 180).all()


def assert_quarantine_of_file(q: Quarantine, path: Path, n_lines: int) -> pl.DataFrame:
    """Every quarantined row of ``path`` names the file, a 1-based line and a reason."""
    table = q.table().filter(pl.col("file") == str(path))
    assert table["line"].null_count() == 0 and table["reason"].null_count() == 0
    assert table["line"].is_between(1, n_lines).all()
    assert (table["reason"].str.len_chars() > 0).all()
    assert not table["content"].str.contains("\x00", literal=True).any()
    return table


def check_raw_result(df: pl.DataFrame, q: Quarantine, path: Path, f: RawFile, n_fields: int) -> None:
    assert_canonical(df)
    rows = f.data_lines()
    table = assert_quarantine_of_file(q, path, len(f.lines))
    bad_lines = set(table["line"])
    assert table["line"].n_unique() == table.height  # one entry per bad line
    assert q.totals[str(path)] == len(rows)
    assert df.height + table.height == len(rows)
    assert bad_lines <= set(rows)
    assert f.numbers(BAD) <= bad_lines, "a malformed row was accepted"
    assert not f.numbers(GOOD) & bad_lines, "a well-formed row was quarantined"
    if f.ending == "truncated" and f.lines:
        last = f.lines[-1].data
        if last.strip(b" \t") and last.isascii() and b"\x00" not in last and last.count(b"\t") + 1 != n_fields:
            reason = table.filter(pl.col("line") == len(f.lines))["reason"].to_list()
            assert reason == ["truncated last line"]


def read_or_data_error(reader, path: Path, q: Quarantine, **kwargs) -> pl.DataFrame | None:
    """Call a reader; a DataError is fine if it names the file, anything else fails the test."""
    try:
        return reader(path, q, **kwargs)
    except DataError as exc:
        assert str(path) in str(exc)
        return None


def assert_budget_error_lists_first_lines(message: str, path: Path, reader, **kwargs) -> None:
    """The DataError of a blown budget names the file and the first (up to 5) bad lines."""
    full = Quarantine(max_bad_fraction=1.0)
    reader(path, full, **kwargs)
    first = full.table().sort("line")["line"].head(5).to_list()
    assert first, "a budget error without bad rows"
    assert str(path) in message and "First bad lines" in message
    positions = [message.index(f"  line {n}: ") for n in first]
    assert positions == sorted(positions)


# ---- TSMC2014 -------------------------------------------------------------------------------------


@FUZZ
@given(f=raw_file(tsmc_line()))
def test_fuzz_tsmc_tolerant_budget(f: RawFile) -> None:
    f = tsmc_encoding_oracle(f)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset_TSMC2014_NYC.txt"
        path.write_bytes(f.render())
        q = Quarantine(max_bad_fraction=1.0)
        if not f.data_lines():
            with pytest.raises(DataError, match="empty") as err:
                read_tsmc(path, q)
            assert str(path) in str(err.value)
            return
        df = read_tsmc(path, q)  # must not raise for a non-empty file
        check_raw_result(df, q, path, f, 8)


def check_default_budget(reader, path: Path, f: RawFile, n_fields: int) -> None:
    """With the default 1 % budget: a clean read of a flawless file, or a DataError naming the file
    (listing its first bad lines when it has data). Files hold at most 30 rows, so one bad row is
    already more than 1 %."""
    q = Quarantine()
    try:
        df = reader(path, q)
    except DataError as exc:
        assert str(path) in str(exc)
        if f.data_lines():
            assert_budget_error_lists_first_lines(str(exc), path, reader)
        return
    assert q.count() == 0 and not f.numbers(BAD)
    check_raw_result(df, q, path, f, n_fields)


@FUZZ
@given(f=raw_file(tsmc_line()))
def test_fuzz_tsmc_default_budget(f: RawFile) -> None:
    f = tsmc_encoding_oracle(f)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dataset_TSMC2014_NYC.txt"
        path.write_bytes(f.render())
        check_default_budget(read_tsmc, path, f, 8)


# ---- Gowalla --------------------------------------------------------------------------------------

ZONES = [None, "America/Los_Angeles", "Asia/Tokyo", "Europe/Berlin"]


@FUZZ
@given(f=raw_file(gowalla_line()), gz=st.booleans(), tz=st.sampled_from(ZONES))
def test_fuzz_gowalla_tolerant_budget(f: RawFile, gz: bool, tz: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("loc-gowalla_totalCheckins.txt" + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(f.render()) if gz else f.render())
        q = Quarantine(max_bad_fraction=1.0)
        if not f.data_lines():
            with pytest.raises(DataError, match="empty") as err:
                read_gowalla(path, q, timezone=tz)
            assert str(path) in str(err.value)
            return
        df = read_gowalla(path, q, timezone=tz)
        check_raw_result(df, q, path, f, 5)
        local = df["utc_time"].dt.convert_time_zone(tz) if tz else df["utc_time"]
        assert (df["local_time"] == local.dt.replace_time_zone(None)).all()


@FUZZ
@given(
    f=raw_file(gowalla_line()),
    box=st.tuples(st.floats(-90, 90), st.floats(-90, 90), st.floats(-180, 180), st.floats(-180, 180)),
)
def test_fuzz_gowalla_bbox_only_cuts_good_rows(f: RawFile, box: tuple[float, float, float, float]) -> None:
    """Reading with a box == reading without one and keeping the rows inside; quarantine unchanged."""
    lat0, lat1, lon0, lon1 = sorted(box[:2]) + sorted(box[2:])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.txt"
        path.write_bytes(f.render())
        q_all, q_box = Quarantine(max_bad_fraction=1.0), Quarantine(max_bad_fraction=1.0)
        full = read_or_data_error(read_gowalla, path, q_all)
        cut = read_or_data_error(read_gowalla, path, q_box, bbox=[lat0, lon0, lat1, lon1])
        assert (full is None) == (cut is None) == (not f.data_lines())
        if full is None:
            return
        inside = full.filter(pl.col("lat").is_between(lat0, lat1) & pl.col("lon").is_between(lon0, lon1))
        assert cut.equals(inside)
        assert q_box.table().equals(q_all.table())


@FUZZ
@given(f=raw_file(gowalla_line()))
def test_fuzz_gowalla_default_budget(f: RawFile) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.txt"
        path.write_bytes(f.render())
        check_default_budget(read_gowalla, path, f, 5)


@FUZZ
@given(rows=st.lists(gowalla_line(), min_size=1, max_size=20), data=st.data())
def test_fuzz_corrupt_gz_is_a_data_error_or_read(rows: list[Line], data: st.DataObject) -> None:
    """Flipped bytes or a cut in a .gz: DataError naming the file (or a clean read), never a traceback."""
    packed = bytearray(gzip.compress(RawFile(rows, "newline", False).render()))
    # Flip bytes of the deflate stream (between the 10-byte header and the 8-byte trailer) or anywhere.
    where = st.one_of(st.integers(10, len(packed) - 9), st.integers(0, len(packed) - 1))
    for at in data.draw(st.lists(where, min_size=1, max_size=3), label="positions"):
        packed[at] ^= data.draw(st.integers(1, 255), label="mask")
    if data.draw(st.booleans(), label="cut"):
        packed = packed[: data.draw(st.integers(0, len(packed) - 1), label="keep")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "loc-gowalla_totalCheckins.txt.gz"
        path.write_bytes(bytes(packed))
        q = Quarantine(max_bad_fraction=1.0)
        df = read_or_data_error(read_gowalla, path, q)
        if df is not None:
            assert_canonical(df)
            assert df.height + q.count() == q.totals[str(path)]


# ---- the budget, deterministically ----------------------------------------------------------------

TSMC_GOOD = (
    "470\t49bbd6c0f964a520f4531fe3\t4bf58dd8d48988d127951735\tArts & Crafts Store\t40.7198\t-74.0025\t-240\t"
    "Tue Apr 03 18:00:09 +0000 2012"
)
GOWALLA_GOOD = "0\t2010-10-19T23:55:27Z\t30.2359091167\t-97.7951395833\t22847"


@pytest.mark.parametrize(
    ("reader", "good", "bad"),
    [(read_tsmc, TSMC_GOOD, TSMC_GOOD.replace("2012", "20x2")), (read_gowalla, GOWALLA_GOOD, GOWALLA_GOOD.replace("T23", " 23"))],
    ids=["tsmc", "gowalla"],
)
@pytest.mark.parametrize(("n_bad", "raises"), [(10, False), (11, True), (40, True)])
def test_budget_of_one_percent(tmp_path: Path, reader, good: str, bad: str, n_bad: int, raises: bool) -> None:
    """1000 rows: 10 bad rows (1.0 %) are quarantined, 11 (1.1 %) stop the run."""
    bad_at = [17 + 23 * k for k in range(n_bad)]  # 1-based line numbers
    lines = [good] * 1000
    for n in bad_at:
        lines[n - 1] = bad
    path = tmp_path / "checkins.txt"
    path.write_text("\n".join(lines) + "\n")
    q = Quarantine()
    if not raises:
        df = reader(path, q)
        assert df.height == 1000 - n_bad and sorted(q.table()["line"]) == bad_at
        return
    with pytest.raises(DataError) as err:
        reader(path, q)
    message = str(err.value)
    assert str(path) in message and f"{n_bad} of 1000 lines are malformed" in message
    for n in bad_at[:5]:
        assert f"line {n}: " in message
    assert f"line {bad_at[5]}: " not in message  # only the first five are listed


@pytest.mark.parametrize("reader", [read_tsmc, read_gowalla], ids=["tsmc", "gowalla"])
def test_missing_file_is_a_data_error(tmp_path: Path, reader) -> None:
    path = tmp_path / "nope" / "checkins.txt"
    with pytest.raises(DataError, match="file not found") as err:
        reader(path, Quarantine())
    assert str(path) in str(err.value)


# ---- the QT-Mob release ---------------------------------------------------------------------------

LOCS = {(-73.976498, 40.785677): 0, (-74.00853183, 40.71992902): 1, (-73.99352537, 40.73427623): 2, (-73.9686574, 40.75881855): 3}
SPLITS = ("train", "valid", "test")


@dataclass
class ReleaseRow:
    data: bytes
    status: str  # GOOD / BAD (the whole row) / UNKNOWN
    units: int | None  # rows the reader must account for (visits of a sound row, 1 for a broken row); None: unknown
    bad_visits: int = 0  # visits of a sound row that must be quarantined


def visit(lon: float, lat: float, t: datetime) -> str:
    return f"{lon!r},{lat!r},{t:%Y-%m-%d %H:%M:%S}"


def trips_cell(items: list[str]) -> str:
    return '"[' + ", ".join(f"'{v}'" for v in items) + ']"'


@st.composite
def release_row(draw, split: str) -> ReleaseRow:
    user = str(draw(st.integers(1, 1083)))
    traj = f"{split}_{draw(st.integers(0, 9999))}"
    n = draw(st.integers(1, 5))
    start = draw(st.datetimes(min_value=datetime(2012, 4, 3), max_value=datetime(2013, 2, 15)))
    items = [visit(*draw(st.sampled_from(list(LOCS))), start + timedelta(minutes=37 * k)) for k in range(n)]
    kind = draw(st.sampled_from([
        "good", "good", "good", "extra_field", "missing_traj", "bad_time", "bad_lat", "bad_lon",
        "unknown_location", "empty_user", "empty_traj", "not_a_list", "empty_list", "nul",
        "invalid_utf8", "garbage",
    ]))
    cells = [user.encode(), trips_cell(items).encode(), traj.encode()]
    row = ReleaseRow(b"", BAD, 1)
    if kind == "good":
        row = ReleaseRow(b"", GOOD, n)
    elif kind in ("bad_time", "bad_lat", "bad_lon", "unknown_location"):
        i = draw(st.integers(0, n - 1))
        lon, lat, t = items[i].split(",")
        if kind == "bad_time":
            t = draw(st.sampled_from(["2012-13-01 00:00:00", "2012-04-08T16:02:10", "yesterday", "2012-04-08"]))
        elif kind == "bad_lat":
            lat = draw(st.sampled_from(["95.0", "-90.5", "nan", "north"]))
        elif kind == "bad_lon":
            lon = draw(st.sampled_from(["190.0", "-180.01", "inf"]))
        else:
            lon, lat = "-70.0", "41.0"
        items[i] = f"{lon},{lat},{t}"
        cells[1] = trips_cell(items).encode()
        row = ReleaseRow(b"", BAD, n, bad_visits=1)
    elif kind == "extra_field":
        cells.append(b"extra")
    elif kind == "missing_traj":
        cells.pop()
    elif kind == "empty_user":
        cells[0] = draw(empty_id).encode()
    elif kind == "empty_traj":
        cells[2] = draw(empty_id).encode()
    elif kind == "not_a_list":
        cells[1] = f"\"'{items[0]}'\"".encode()
    elif kind == "empty_list":
        cells[1] = b'"[]"'
    elif kind in ("nul", "invalid_utf8"):
        i = draw(st.integers(0, 2))
        piece = b"\x00" if kind == "nul" else draw(st.sampled_from(INVALID_UTF8))
        cells[i] = _insert(draw, cells[i], piece)
    elif kind == "garbage":
        text = draw(st.text(alphabet=st.characters(blacklist_characters='\n\r"', blacklist_categories=("Cs",)), max_size=40))
        return ReleaseRow(b"#" + text.encode(), UNKNOWN, None)
    row.data = b",".join(cells)
    return row


@st.composite
def release_file(draw, split: str) -> tuple[list[ReleaseRow], str]:
    rows = draw(st.lists(release_row(split), min_size=1, max_size=8))
    ending = draw(st.sampled_from(["newline", "newline", "none", "truncated"]))
    if ending == "truncated" and len(rows[-1].data) > 1:
        last = rows[-1].data
        rows[-1] = ReleaseRow(last[: draw(st.integers(1, len(last) - 1))], UNKNOWN, None)
    return rows, ending


def write_release(root: Path, files: dict[str, tuple[list[ReleaseRow], str] | bytes | None]) -> None:
    """A release folder: loc2id, prompts, user_profile.csv and the given trips files.

    ``files[split]`` is ``(rows, ending)``, raw bytes, or None for a missing file.
    """
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "loc2id").write_bytes(pickle.dumps(LOCS))
    for (lon, lat), i in LOCS.items():
        (root / "prompts" / f"{i}.txt").write_text(
            f'The name of this location is "Place {i}" and its POI category is Bar, belonging to the '
            f"parent category Nightlife Spot.\nThe coordinates for this location are ({lat}, {lon}).\n"
            f"The address is {i} Broadway.\n"
        )
    (root / "user_profile.csv").write_text('user_id|prompt|latest_5_trips\n1|"likes bars"|x\n')
    for split, spec in files.items():
        path = root / f"trips_{split}.csv"
        if spec is None:
            path.unlink(missing_ok=True)
        elif isinstance(spec, bytes):
            path.write_bytes(spec)
        else:
            rows, ending = spec
            body = b"user_id,trips,traj_id\n" + b"\n".join(r.data for r in rows)
            path.write_bytes(body + (b"\n" if ending == "newline" else b""))


def check_release_result(root: Path, df: pl.DataFrame, q: Quarantine, files: dict) -> None:
    assert_canonical(df)
    assert df["traj_id"].null_count() == 0 and not df["traj_id"].str.contains("\x00", literal=True).any()
    assert set(df["poi_id"]) <= {str(i) for i in LOCS.values()}
    coords = {str(i): (lat, lon) for (lon, lat), i in LOCS.items()}
    assert all(coords[p] == (lat, lon) for p, lat, lon in df.select("poi_id", "lat", "lon").iter_rows())
    for split in SPLITS:
        rows, _ = files[split]
        path = root / f"trips_{split}.csv"
        table = assert_quarantine_of_file(q, path, len(rows) + 1)
        n_out = df.filter(pl.col("split") == split).height
        # The budget counts lines (records); the visits are accounted for separately.
        assert q.totals[str(path)] == sum(1 for r in rows if r.data.strip()), "the budget's denominator is the data lines"
        lines = {i: r for i, r in enumerate(rows, 2)}  # the header is line 1
        if all(r.units is not None for r in rows):
            assert n_out + table.height == sum(r.units for r in rows), "visits read != visits kept + visits quarantined"
        quarantined = table.group_by("line").len()
        per_line = dict(quarantined.iter_rows())
        for line, r in lines.items():
            if r.status == GOOD:
                assert line not in per_line, f"{path.name} line {line}: a well-formed row was quarantined"
            elif r.status == BAD:
                assert line in per_line, f"{path.name} line {line}: a malformed row was not quarantined"
                assert per_line[line] == (r.bad_visits or 1)


@FUZZ_RELEASE
@given(files=st.fixed_dictionaries({s: release_file(s) for s in SPLITS}))
def test_fuzz_release_tolerant_budget(files: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_release(root, files)
        q = Quarantine(max_bad_fraction=1.0)
        df, _ = read_qtmob_release(root, q)  # every file has rows: must not raise
        check_release_result(root, df, q, files)


@FUZZ_RELEASE
@given(
    files=st.fixed_dictionaries({s: release_file(s) for s in SPLITS}),
    broken=st.sampled_from([None, "missing", "empty", "header_only", "no_header"]),
    which=st.sampled_from(SPLITS),
)
def test_fuzz_release_never_a_traceback(files: dict, broken: str | None, which: str) -> None:
    """Default budget, plus missing/empty files: canonical frame or a DataError naming a file."""
    spec: dict = dict(files)
    if broken == "missing":
        spec[which] = None
    elif broken == "empty":
        spec[which] = b""
    elif broken == "header_only":
        spec[which] = b"user_id,trips,traj_id\n"
    elif broken == "no_header":
        spec[which] = b"\n".join(r.data for r in files[which][0]) + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_release(root, spec)
        q = Quarantine()
        try:
            df, _ = read_qtmob_release(root, q)
        except DataError as exc:
            assert str(root) in str(exc)
            return
        assert broken is None
        assert_canonical(df)
        for split in SPLITS:
            path = str(root / f"trips_{split}.csv")
            assert q.count(path) <= 0.01 * q.totals[path]


def good_rows(split: str, n: int) -> list[ReleaseRow]:
    t = datetime(2012, 4, 8, 16, 2, 10)
    rows = []
    for k in range(n):
        items = [visit(lon, lat, t + timedelta(days=k, hours=h)) for h, (lon, lat) in enumerate(list(LOCS)[:3])]
        rows.append(ReleaseRow(f"{k % 7 + 1},{trips_cell(items)},{split}_{k}".encode(), GOOD, 3))
    return rows


def test_release_reads_the_published_format(tmp_path: Path) -> None:
    files = {s: (good_rows(s, 4), "newline") for s in SPLITS}
    write_release(tmp_path, files)
    q = Quarantine()
    df, descriptions = read_qtmob_release(tmp_path, q)
    check_release_result(tmp_path, df, q, files)
    assert df.height == 3 * 4 * 3 and q.count() == 0
    first = df.row(0, named=True)
    assert (first["user_id"], first["traj_id"], first["split"], first["poi_id"]) == ("1", "train_0", "train", "0")
    assert first["local_time"] == datetime(2012, 4, 8, 16, 2, 10)
    assert first["utc_time"].replace(tzinfo=None) == datetime(2012, 4, 8, 20, 2, 10)  # EDT
    assert (first["name"], first["category"], first["parent_category"]) == ("Place 0", "Bar", "Nightlife Spot")
    assert descriptions.height == len(LOCS)


@pytest.mark.parametrize(
    ("defect", "line"),
    [
        pytest.param(b"5,\"['-73.976498,40.785677,2012-04-08 16:02:10']\",train_9,extra", b"", id="extra field"),
        pytest.param(b"5\xff,\"['-73.976498,40.785677,2012-04-08 16:02:10']\",train_9", b"", id="invalid UTF-8"),
        pytest.param(b"5\x00,\"['-73.976498,40.785677,2012-04-08 16:02:10']\",train_9", b"", id="NUL in user id"),
        pytest.param(b"5,\"[]\",train_9", b"", id="trajectory without visits"),
        pytest.param(b"5,\"['-73.976498,40.785677,2012-04-08 16:02:10']\",", b"", id="empty trajectory id"),
        pytest.param(b"5,\"['-73.976498,40.785677", None, id="truncated last line"),
    ],
)
def test_release_malformed_row_is_quarantined(tmp_path: Path, defect: bytes, line: bytes | None) -> None:
    """One malformed row among 200 good ones is quarantined with its line; the other rows are read."""
    rows = good_rows("train", 200)
    body = b"user_id,trips,traj_id\n" + b"\n".join(r.data for r in rows[:100]) + b"\n" + defect
    body += b"" if line is None else b"\n" + b"\n".join(r.data for r in rows[100:]) + b"\n"
    n_good = 100 if line is None else 200
    write_release(tmp_path, {"train": body, "valid": (good_rows("valid", 2), "newline"), "test": (good_rows("test", 2), "newline")})
    q = Quarantine(max_bad_fraction=1.0)
    df, _ = read_qtmob_release(tmp_path, q)
    assert_canonical(df)
    path = str(tmp_path / "trips_train.csv")
    assert df.filter(pl.col("split") == "train").height == 3 * n_good
    assert q.table().filter(pl.col("file") == path)["line"].to_list() == [102]
    assert q.totals[path] == n_good + 1, "the budget counts the lines (200 good + 1 bad)"


def test_release_local_time_in_the_dst_gap(tmp_path: Path) -> None:
    """2012-03-11 02:30 does not exist in New York: the visit must not get a null UTC time.

    Quarantining the visit or mapping it to a real instant are both fine; a null is not.
    """
    rows = good_rows("test", 200)
    (a, b, c) = list(LOCS)[:3]
    gap = [visit(*a, datetime(2012, 3, 11, 1, 50)), visit(*b, datetime(2012, 3, 11, 2, 30)), visit(*c, datetime(2012, 3, 11, 3, 40))]
    rows.append(ReleaseRow(f"3,{trips_cell(gap)},test_200".encode(), UNKNOWN, 3))
    files = {"train": (good_rows("train", 3), "newline"), "valid": (good_rows("valid", 2), "newline"), "test": (rows, "newline")}
    write_release(tmp_path, files)
    q = Quarantine(max_bad_fraction=1.0)
    df, _ = read_qtmob_release(tmp_path, q)
    assert df["utc_time"].null_count() == 0, "a local time in the DST gap became a null UTC time"
    check_release_result(tmp_path, df, q, files)


def test_release_budget_lists_first_bad_lines(tmp_path: Path) -> None:
    rows = good_rows("valid", 50)
    for k in (3, 9, 20, 21, 30, 44):  # 0-based rows -> lines k + 2
        rows[k] = ReleaseRow(b" ,\"['x']\",valid_0", BAD, 1)  # empty user id
    files = {"train": (good_rows("train", 3), "newline"), "valid": (rows, "newline"), "test": (good_rows("test", 2), "newline")}
    write_release(tmp_path, files)
    with pytest.raises(DataError) as err:
        read_qtmob_release(tmp_path, Quarantine())
    message = str(err.value)
    # 6 bad lines of 50 (the budget counts lines, not the 138 visits).
    assert str(tmp_path / "trips_valid.csv") in message and "6 of 50 lines are malformed" in message
    assert [f"  line {k + 2}: " in message for k in (3, 9, 20, 21, 30, 44)] == [True] * 5 + [False]


def test_release_budget_counts_lines_not_visits(tmp_path: Path) -> None:
    """Regression: 2 % bad lines passed as 0.7 % of the visits."""
    rows = good_rows("valid", 1000)
    for k in range(0, 1000, 50):  # 20 lines with a NUL byte
        rows[k] = ReleaseRow(rows[k].data.replace(b"valid_", b"valid\x00_"), BAD, 3)
    files = {"train": (good_rows("train", 3), "newline"), "valid": (rows, "newline"), "test": (good_rows("test", 2), "newline")}
    write_release(tmp_path, files)
    with pytest.raises(DataError, match=r"trips_valid.csv: 20 of 1000 lines are malformed \(2.0% >"):
        read_qtmob_release(tmp_path, Quarantine())
