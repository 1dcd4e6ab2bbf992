"""The raw-dump readers (Foursquare TSMC2014, SNAP Gowalla) on files written in their real formats.

Every test writes its own small raw file into ``tmp_path``: the readers must turn it into the
canonical check-in table (:data:`datamodules.schema.CHECKIN_SCHEMA`) with the right UTC/local times,
coordinates and categories. The end-to-end tests format a synthetic city as a raw TSMC/Gowalla dump
and run ``stage=data`` on it through Hydra, as ``python run.py`` would.
"""

from __future__ import annotations

import gzip
import json
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hydra import compose, initialize_config_dir

import run as run_module
from pipeline.paths import data_dir
from datamodules.config import DataConfig, ProtocolConfig
from datamodules.dataset import load_dataset
from datamodules.errors import DataError, Quarantine
from datamodules.readers.raw_formats import read_category_side_file, read_gowalla, read_tsmc
from datamodules.readers.synthetic import CATEGORIES, generate_city
from datamodules.schema import CHECKIN_SCHEMA

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments"
UTC = timezone.utc
TASKS = {"next", "recovery_multi", "recovery_single", "index2loc", "loc2index", "translation"}
#: Protocol with every filter off, for readers tests that go through ``load_dataset``.
LOOSE_PROTOCOL = {"min_user_checkins": 1, "min_poi_checkins": 1, "min_traj_len": 1}


def _data(fields: dict) -> DataConfig:
    """The typed ``data`` settings ``load_dataset`` takes (the protocol as a :class:`ProtocolConfig`)."""
    return DataConfig(**{**fields, "protocol": ProtocolConfig(**fields.get("protocol", {}))})


# ---- writing raw files ----------------------------------------------------------------------------


def tsmc_time(t: datetime) -> str:
    """TSMC2014's UTC time format, e.g. ``Tue Apr 03 18:00:09 +0000 2012`` (English names)."""
    days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    return f"{days[t.weekday()]} {months[t.month - 1]} {t.day:02d} {t:%H:%M:%S} +0000 {t.year}"


def tsmc_line(user: str, venue: str, cat_id: str, cat: str, lat: float, lon: float, tz: int, utc: datetime) -> str:
    return "\t".join([user, venue, cat_id, cat, repr(lat), repr(lon), str(tz), tsmc_time(utc)])


def gowalla_line(user: str, utc: datetime, lat: float, lon: float, loc: str) -> str:
    return f"{user}\t{utc:%Y-%m-%dT%H:%M:%SZ}\t{lat!r}\t{lon!r}\t{loc}"


def write_text(path: Path, lines: list[str], encoding: str = "utf-8", newline: str = "\n") -> Path:
    data = "".join(line + newline for line in lines).encode(encoding)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


TSMC_ROWS = [
    tsmc_line("470", "49bbd6c0f964a520f4531fe3", "4bf58dd8d48988d127951735", "Arts & Crafts Store",
              40.719810375488535, -74.00258103213994, -240, datetime(2012, 4, 3, 18, 0, 9, tzinfo=UTC)),
    tsmc_line("979", "4a43c0aef964a520c6a61fe3", "4bf58dd8d48988d1df941735", "Bridge",
              40.60679958140643, -74.04416981025437, -240, datetime(2012, 4, 3, 18, 0, 25, tzinfo=UTC)),
    tsmc_line("69", "4c5cc7b485a1e21e00d35711", "4bf58dd8d48988d103941735", "Home (private)",
              40.716161684843215, -73.88307005845945, -240, datetime(2012, 4, 3, 18, 2, 24, tzinfo=UTC)),
]


# ---- TSMC2014 -------------------------------------------------------------------------------------


def test_tsmc_rows_become_canonical_checkins(tmp_path: Path) -> None:
    path = write_text(tmp_path / "dataset_TSMC2014_NYC.txt", TSMC_ROWS)
    q = Quarantine()
    df = read_tsmc(path, q)
    assert dict(df.schema) == CHECKIN_SCHEMA and df.columns == list(CHECKIN_SCHEMA)
    assert df.height == 3 and q.count() == 0 and q.totals[str(path)] == 3
    first = df.row(0, named=True)
    assert first["user_id"] == "470" and first["poi_id"] == "49bbd6c0f964a520f4531fe3"
    assert first["utc_time"] == datetime(2012, 4, 3, 18, 0, 9, tzinfo=UTC)
    assert first["local_time"] == datetime(2012, 4, 3, 14, 0, 9)  # UTC - 240 min
    assert first["lat"] == 40.719810375488535 and first["lon"] == -74.00258103213994
    assert first["category"] == "Arts & Crafts Store"
    # The reader knows no parent, name, address, trajectory or split.
    for col in ("parent_category", "name", "address", "traj_id", "split"):
        assert df[col].null_count() == 3, col
    assert df["category"].to_list() == ["Arts & Crafts Store", "Bridge", "Home (private)"]


def test_tsmc_positive_offset_crosses_midnight(tmp_path: Path) -> None:
    utc = datetime(2012, 4, 3, 18, 0, 9, tzinfo=UTC)
    line = tsmc_line("1", "v1", "c1", "Ramen / Noodle House", 35.70, 139.77, 540, utc)
    df = read_tsmc(write_text(tmp_path / "tky.txt", [line]), Quarantine())
    assert df["utc_time"].to_list() == [utc]
    assert df["local_time"].to_list() == [datetime(2012, 4, 4, 3, 0, 9)]  # Tokyo, UTC+9


def test_tsmc_latin1_category_decodes(tmp_path: Path) -> None:
    utc = datetime(2012, 4, 3, 18, 0, 9, tzinfo=UTC)
    rows = TSMC_ROWS + [tsmc_line("5", "v5", "c5", "Café", 40.7, -73.9, -240, utc)]
    latin = write_text(tmp_path / "latin1.txt", rows, encoding="latin-1")
    assert b"Caf\xe9\t" in latin.read_bytes()  # the raw dump's encoding
    utf8 = write_text(tmp_path / "utf8.txt", rows, encoding="utf-8")
    q = Quarantine()
    from_latin, from_utf8 = read_tsmc(latin, q), read_tsmc(utf8, q)
    assert from_latin["category"][-1] == "Café"
    assert from_latin.equals(from_utf8)
    assert q.count() == 0


def test_tsmc_crlf_blank_lines_and_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(("\r\n".join([TSMC_ROWS[0], "", "  ", TSMC_ROWS[1], "not\ta\trow", TSMC_ROWS[2]])).encode())
    q = Quarantine(max_bad_fraction=1.0)
    df = read_tsmc(path, q)
    assert df["user_id"].to_list() == ["470", "979", "69"]
    assert df["utc_time"][2] == datetime(2012, 4, 3, 18, 2, 24, tzinfo=UTC)  # no "\r" left on the last field
    # Blank lines are not data rows but keep the line numbers of the rows after them.
    assert q.totals[str(path)] == 4
    assert q.table().select("line", "reason").rows() == [(5, "expected 8 fields separated by '\\t', got 3")]


BAD_TSMC = {
    "wrong field count": ("470\tv\tc\tBar\t40.7\t-74.0\t-240", "expected 8 fields"),
    "unparsable time": (TSMC_ROWS[0].replace("Apr 03", "Apr 33"), "unparsable UTC time"),
    "latitude outside": (TSMC_ROWS[0].replace("40.719810375488535", "91.5"), "latitude outside"),
    "longitude outside": (TSMC_ROWS[0].replace("-74.00258103213994", "-180.5"), "longitude outside"),
    "latitude not a number": (TSMC_ROWS[0].replace("40.719810375488535", "north"), "latitude is not a number"),
    "empty user": ("\t" + TSMC_ROWS[0].split("\t", 1)[1], "empty user id"),
    "empty venue": (TSMC_ROWS[0].replace("49bbd6c0f964a520f4531fe3", " "), "empty location id"),
    "bad offset": (TSMC_ROWS[0].replace("\t-240\t", "\t-4h\t"), "timezone offset is not an integer"),
    "offset too large": (TSMC_ROWS[0].replace("\t-240\t", "\t-900\t"), "timezone offset outside"),
    "NUL byte": (TSMC_ROWS[0].replace("Arts", "Ar\x00ts"), "NUL byte"),
}


@pytest.mark.parametrize("kind", list(BAD_TSMC))
def test_tsmc_bad_row_is_quarantined_with_line_and_reason(tmp_path: Path, kind: str) -> None:
    bad, reason = BAD_TSMC[kind]
    lines = TSMC_ROWS * 40 + [bad] + TSMC_ROWS * 40  # 1 bad row in 241: under the 1 % budget
    path = write_text(tmp_path / "nyc.txt", lines)
    q = Quarantine()
    df = read_tsmc(path, q)
    assert df.height == 240
    table = q.table()
    assert table.height == 1
    row = table.row(0, named=True)
    assert row["file"] == str(path) and row["line"] == 121
    assert reason in row["reason"]
    assert "\x00" not in row["content"]  # the evidence is printable


def test_tsmc_truncated_last_line_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "cut.txt"
    path.write_bytes(("\n".join(TSMC_ROWS * 50) + "\n" + TSMC_ROWS[0][:40]).encode())
    q = Quarantine()
    df = read_tsmc(path, q)
    assert df.height == 150
    assert q.table().select("line", "reason").rows() == [(151, "truncated last line")]


def test_tsmc_too_many_bad_rows_stop_with_a_data_error(tmp_path: Path) -> None:
    bad = BAD_TSMC["unparsable time"][0]
    path = write_text(tmp_path / "nyc.txt", [bad, TSMC_ROWS[0], bad] + TSMC_ROWS * 10)
    with pytest.raises(DataError) as err:
        read_tsmc(path, Quarantine())
    message = str(err.value)
    assert str(path) in message and "2 of 33 lines" in message
    assert "line 1:" in message and "line 3:" in message


@pytest.mark.parametrize("content", [None, b"", b"\n \n\t\n"])
def test_tsmc_missing_or_empty_file_is_a_data_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "dataset_TSMC2014_NYC.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match="TSMC2014") as err:
        read_tsmc(path, Quarantine())
    assert str(path) in str(err.value)


# ---- Gowalla --------------------------------------------------------------------------------------


GOWALLA_ROWS = [
    gowalla_line("0", datetime(2010, 10, 19, 23, 55, 27, tzinfo=UTC), 30.2359091167, -97.7951395833, "22847"),
    gowalla_line("0", datetime(2010, 10, 18, 22, 17, 43, tzinfo=UTC), 30.2691029532, -97.7493953705, "420315"),
    gowalla_line("1", datetime(2010, 1, 15, 20, 0, 0, tzinfo=UTC), 37.7749, -122.4194, "9410"),
    gowalla_line("2", datetime(2010, 7, 4, 3, 30, 0, tzinfo=UTC), 34.0522, -118.2437, "777"),
]


@pytest.mark.parametrize("name", ["loc-gowalla_totalCheckins.txt", "loc-gowalla_totalCheckins.txt.gz"])
def test_gowalla_plain_and_gz(tmp_path: Path, name: str) -> None:
    path = write_text(tmp_path / name, GOWALLA_ROWS)
    q = Quarantine()
    df = read_gowalla(path, q)
    assert dict(df.schema) == CHECKIN_SCHEMA
    assert df.height == 4 and q.count() == 0 and q.totals[str(path)] == 4
    first = df.row(0, named=True)
    assert (first["user_id"], first["poi_id"]) == ("0", "22847")
    assert first["utc_time"] == datetime(2010, 10, 19, 23, 55, 27, tzinfo=UTC)
    assert first["local_time"] == datetime(2010, 10, 19, 23, 55, 27)  # no timezone: local = UTC
    assert (first["lat"], first["lon"]) == (30.2359091167, -97.7951395833)
    for col in ("category", "parent_category", "name", "address", "traj_id", "split"):
        assert df[col].null_count() == 4, col


def test_gowalla_gz_equals_plain(tmp_path: Path) -> None:
    plain = read_gowalla(write_text(tmp_path / "a.txt", GOWALLA_ROWS), Quarantine())
    packed = read_gowalla(write_text(tmp_path / "a.txt.gz", GOWALLA_ROWS), Quarantine())
    assert plain.equals(packed)


def test_gowalla_timezone_conversion_follows_dst(tmp_path: Path) -> None:
    df = read_gowalla(write_text(tmp_path / "g.txt", GOWALLA_ROWS), Quarantine(), timezone="America/Los_Angeles")
    assert df["local_time"].to_list() == [
        datetime(2010, 10, 19, 16, 55, 27),  # PDT, UTC-7
        datetime(2010, 10, 18, 15, 17, 43),
        datetime(2010, 1, 15, 12, 0, 0),  # PST, UTC-8
        datetime(2010, 7, 3, 20, 30, 0),  # the previous local day
    ]
    assert df["utc_time"][0] == datetime(2010, 10, 19, 23, 55, 27, tzinfo=UTC)  # UTC unchanged


def test_gowalla_bbox_cut_is_not_quarantined(tmp_path: Path) -> None:
    path = write_text(tmp_path / "g.txt", GOWALLA_ROWS)
    q = Quarantine()
    df = read_gowalla(path, q, bbox=[32.5, -124.5, 42.0, -114.1])  # California
    assert df["poi_id"].to_list() == ["9410", "777"]
    assert q.count() == 0 and q.totals[str(path)] == 4  # all four rows were read
    # The box is inclusive.
    edge = read_gowalla(path, Quarantine(), bbox=[30.2359091167, -97.7951395833, 30.3, -97.7])
    assert edge["poi_id"].to_list() == ["22847", "420315"]


BAD_GOWALLA = {
    "wrong field count": ("0\t2010-10-19T23:55:27Z\t30.2\t-97.7", "expected 5 fields"),
    "unparsable time": ("0\t2010-10-19 23:55:27\t30.2\t-97.7\t1", "unparsable time"),
    "latitude outside": ("0\t2010-10-19T23:55:27Z\t-90.01\t-97.7\t1", "latitude outside"),
    "longitude outside": ("0\t2010-10-19T23:55:27Z\t30.2\t197.7\t1", "longitude outside"),
    "nan latitude": ("0\t2010-10-19T23:55:27Z\tnan\t-97.7\t1", "latitude outside"),
    "empty location": ("0\t2010-10-19T23:55:27Z\t30.2\t-97.7\t", "empty location id"),
    "invalid UTF-8": ("0\t2010-10-19T23:55:27Z\t30.2\t-97.7\t1\udcff", "invalid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD_GOWALLA))
def test_gowalla_bad_row_is_quarantined(tmp_path: Path, kind: str) -> None:
    bad, reason = BAD_GOWALLA[kind]
    path = tmp_path / "g.txt.gz"
    body = "".join(line + "\n" for line in GOWALLA_ROWS * 30 + [bad] + GOWALLA_ROWS * 30)
    path.write_bytes(gzip.compress(body.encode("utf-8", errors="surrogateescape")))
    q = Quarantine()
    df = read_gowalla(path, q)
    assert df.height == 240
    rows = q.table().select("file", "line", "reason").rows()
    assert len(rows) == 1 and rows[0][:2] == (str(path), 121) and reason in rows[0][2]


def test_corrupt_gz_is_a_data_error(tmp_path: Path) -> None:
    packed = gzip.compress("".join(line + "\n" for line in GOWALLA_ROWS * 50).encode())
    path = tmp_path / "loc-gowalla_totalCheckins.txt.gz"
    # A valid gzip header and trailer around a broken deflate stream ("invalid block type").
    path.write_bytes(packed[:10] + b"\xff" * 16 + packed[-8:])
    with pytest.raises(DataError) as err:
        read_gowalla(path, Quarantine())
    assert str(path) in str(err.value)


def test_plain_text_named_gz_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "g.txt.gz"
    path.write_text("\n".join(GOWALLA_ROWS) + "\n")
    with pytest.raises(DataError, match="cannot read"):
        read_gowalla(path, Quarantine())


# ---- Gowalla category side file -------------------------------------------------------------------


def test_category_side_file_with_and_without_parents(tmp_path: Path) -> None:
    path = write_text(tmp_path / "g.txt", GOWALLA_ROWS)
    with_parent = tmp_path / "cats.csv"
    with_parent.write_text(
        "location_id,category,parent_category\n22847,Coffee Shop,Food\n420315,Park,Outdoors\n22847,Bar,Nightlife\n"
    )
    df = read_gowalla(path, Quarantine(), categories=with_parent)
    cats = dict(zip(df["poi_id"], zip(df["category"], df["parent_category"])))
    assert cats["22847"] == ("Coffee Shop", "Food")  # the first of duplicate ids wins
    assert cats["420315"] == ("Park", "Outdoors")
    assert cats["9410"] == (None, None) and cats["777"] == (None, None)  # not in the side file
    assert df.height == 4  # the join neither drops nor duplicates check-ins

    leaf_only = tmp_path / "leaves.csv"
    leaf_only.write_text("location_id,category\n9410,Coffee Shop\n")
    df = read_gowalla(path, Quarantine(), categories=leaf_only)
    assert dict(zip(df["poi_id"], df["category"]))["9410"] == "Coffee Shop"
    assert df["parent_category"].null_count() == 4  # the reader does not invent parents


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "not found"), ("location,cat\n1,Bar\n", "needs columns"), ("", "cannot parse")],
)
def test_bad_category_side_file_is_a_data_error(tmp_path: Path, content: str | None, match: str) -> None:
    side = tmp_path / "cats.csv"
    if content is not None:
        side.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        read_category_side_file(side)
    assert str(side) in str(err.value)


# ---- through load_dataset: parent categories, timezone --------------------------------------------


def small_gowalla(tmp_path: Path) -> tuple[Path, Path]:
    """A Gowalla file with three users' daily trajectories over POIs 1..4, and a side file."""
    lines = []
    start = datetime(2010, 6, 1, 16, 0, tzinfo=UTC)
    for user in ("10", "11", "12"):
        for d in range(12):
            for k, loc in enumerate(("1", "2", "3", "4")):
                t = start + timedelta(days=d, hours=k, minutes=int(user))
                lines.append(gowalla_line(user, t, 37.77 + int(loc) / 100, -122.41, loc))
    path = write_text(tmp_path / "loc-gowalla_totalCheckins.txt.gz", lines)
    side = tmp_path / "cats.csv"
    side.write_text("location_id,category,parent_category\n1,Coffee Shop,\n2,Tacos,Mexican Food\n3,Park,\n")
    return path, side


def test_load_dataset_fills_parent_categories_for_gowalla(tmp_path: Path) -> None:
    path, side = small_gowalla(tmp_path)
    data = load_dataset(_data({
        "format": "gowalla", "name": "g", "root": str(tmp_path), "file": path.name,
        "categories": str(side), "timezone": "America/Los_Angeles", "protocol": LOOSE_PROTOCOL,
    }))
    c = data.checkins
    parents = dict(c.select("poi_id", "parent_category").unique().iter_rows())
    assert parents["1"] == "Food"  # filled from the leaf "Coffee Shop"
    assert parents["2"] == "Mexican Food"  # the side file's own parent is kept
    assert parents["3"] == "Outdoors & Recreation"  # filled from "Park"
    assert parents["4"] is None  # no category, no parent
    assert c.height == 3 * 12 * 4 and data.quarantine.count() == 0
    assert (c["local_time"] == c["utc_time"].dt.convert_time_zone("America/Los_Angeles").dt.replace_time_zone(None)).all()
    assert c["local_time"].min() == datetime(2010, 6, 1, 9, 10)  # 16:10 UTC = 09:10 PDT


def test_load_dataset_fills_parent_categories_for_tsmc(tmp_path: Path) -> None:
    path = write_text(tmp_path / "dataset_TSMC2014_NYC.txt", TSMC_ROWS * 4, encoding="latin-1")
    data = load_dataset(_data({"format": "tsmc", "root": str(tmp_path), "file": path.name, "protocol": LOOSE_PROTOCOL}))
    parents = dict(data.checkins.select("category", "parent_category").unique().iter_rows())
    assert parents["Home (private)"] == "Residence"
    assert parents["Bridge"] == "Outdoors & Recreation"  # as the QT-Mob release files it
    assert data.checkins["parent_category"].null_count() == 0


def test_parent_categories_agree_with_the_synthetic_taxonomy(tmp_path: Path) -> None:
    """A TSMC dump carries only leaf names; the parents load_dataset fills in must be Foursquare's.

    The synthetic city states the Foursquare parent of each of its 41 leaves (e.g. "Salon /
    Barbershop" -> "Shop & Service", "Tech Startup" -> "Professional & Other Places").
    """
    leaves = sorted(CATEGORIES)
    lines = []
    for d in range(0, 30, 3):  # one user visits one POI per leaf, in one trajectory every third day
        for k, leaf in enumerate(leaves):
            utc = datetime(2012, 4, 2, 12, tzinfo=UTC) + timedelta(days=d, minutes=10 * k)
            lines.append(tsmc_line("1", f"venue{k}", f"cat{k}", leaf, 40.7 + k / 1000, -73.9, -240, utc))
    path = write_text(tmp_path / "dataset_TSMC2014_NYC.txt", lines, encoding="latin-1")
    data = load_dataset(_data({"format": "tsmc", "root": str(tmp_path), "file": path.name, "protocol": LOOSE_PROTOCOL}))
    got = dict(data.checkins.select("category", "parent_category").unique().iter_rows())
    assert set(got) == set(leaves)
    wrong = {leaf: (parent, CATEGORIES[leaf][0]) for leaf, parent in got.items() if parent != CATEGORIES[leaf][0]}
    assert not wrong, f"leaf: (filled parent, Foursquare parent): {wrong}"


def test_invalid_timezone_is_a_data_error(tmp_path: Path) -> None:
    path, _ = small_gowalla(tmp_path)
    with pytest.raises(DataError, match="Mars/Olympus"):
        load_dataset(_data({
            "format": "gowalla", "root": str(tmp_path), "file": path.name,
            "timezone": "Mars/Olympus", "protocol": LOOSE_PROTOCOL,
        }))


# ---- end to end: raw dumps through `stage=data` ---------------------------------------------------


def write_city_as_tsmc(city: pl.DataFrame, path: Path, bad_rows: int = 0) -> Path:
    """Format canonical check-ins as a Latin-1 TSMC2014 dump (plus ``bad_rows`` malformed rows)."""
    lines = []
    for r in city.iter_rows(named=True):
        offset = int((r["local_time"] - r["utc_time"].replace(tzinfo=None)).total_seconds() // 60)
        cat_id = f"{zlib.crc32(r['category'].encode()):024x}"
        lines.append(tsmc_line(r["user_id"], r["poi_id"], cat_id, r["category"], r["lat"], r["lon"], offset, r["utc_time"]))
    for k in range(bad_rows):  # spread through the file
        at = (k + 1) * len(lines) // (bad_rows + 1)
        lines[at] = lines[at].replace(" +0000 ", " +0000 year")
    return write_text(path, lines, encoding="latin-1")


def summary_dir(art: Path, dataset: str) -> Path:
    """The one data folder (``data-<fingerprint>``) a single data stage wrote."""
    (found,) = (art / dataset).glob("data-*")
    return found


def run_stage_data(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="run", overrides=overrides)
    results = run_module.run(cfg)
    summary_path = data_dir(cfg) / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary == json.loads(json.dumps(results["data"]))
    return summary


def assert_summary_consistent(summary: dict, data_dir: Path) -> None:
    splits = summary["splits"]
    assert set(splits) == {"train", "valid", "test"}
    assert sum(s["checkins"] for s in splits.values()) == summary["checkins"]
    assert sum(s["trajectories"] for s in splits.values()) == summary["trajectories"]
    assert all(s["checkins"] > 0 and s["trajectories"] > 0 for s in splits.values())
    p = summary["protocol"]
    assert p["output_checkins"] == summary["checkins"]
    dropped = p["dropped_sparse_users_pois"] + p["dropped_cold_start"] + p["dropped_short_trajectories"]
    assert p["input_checkins"] == p["output_checkins"] + dropped
    samples = summary["samples"]
    assert set(samples) == TASKS
    assert samples["next"]["test"] == splits["test"]["trajectories"]
    assert samples["index2loc"]["train"] == samples["loc2index"]["train"] == summary["described_locations"]
    assert samples["translation"]["train"] == samples["recovery_multi"]["train"] == splits["train"]["trajectories"]
    checkins = pl.read_parquet(data_dir / "checkins.parquet")
    assert checkins.height == summary["checkins"]
    assert {k: v for k, v in checkins.schema.items() if k in CHECKIN_SCHEMA} == CHECKIN_SCHEMA
    assert checkins["parent_category"].null_count() == 0
    index = pl.read_parquet(data_dir / "sample_index.parquet")
    assert index.height == sum(n for per_split in samples.values() for n in per_split.values())
    quarantine = pl.read_csv(data_dir / "quarantine.csv")
    assert quarantine.height == summary["quarantined_rows"] == summary["quarantine"]["total"]


@pytest.mark.parametrize("bad_rows", [0, 3])
def test_tsmc_dump_end_to_end(tmp_path: Path, bad_rows: int) -> None:
    raw, art = tmp_path / "raw", tmp_path / "art"
    raw.mkdir()
    city = generate_city(seed=1, n_users=60, n_pois=300, days=90)
    path = write_city_as_tsmc(city, raw / "dataset_TSMC2014_NYC.txt", bad_rows=bad_rows)
    summary = run_stage_data(["data=tsmc_nyc", f"data.root={raw}", f"paths.artifacts={art}", "stage=data"])
    out = Path(summary_dir(art, "tsmc_nyc"))
    assert_summary_consistent(summary, out)
    assert summary["quarantined_rows"] == bad_rows
    assert summary["quarantine"]["files"][str(path)] == {
        "rows": city.height, "quarantined": bad_rows, "bad_lines": bad_rows,
        "reasons": {"unparsable UTC time (expected e.g. 'Tue Apr 03 18:00:09 +0000 2012')": bad_rows} if bad_rows else {},
        "encoding": "latin-1", "duplicate_lines": 0, "duplicates_dropped": False,
    }
    assert summary["protocol"]["input_checkins"] == city.height - bad_rows
    checkins = pl.read_parquet(out / "checkins.parquet")
    # The dump's times and coordinates survive the round trip exactly.
    assert (checkins["local_time"] - checkins["utc_time"].dt.replace_time_zone(None) == timedelta(hours=-4)).all()
    truth = city.select("user_id", "poi_id", "utc_time", "lat", "lon", "category")
    joined = checkins.join(truth, on=["user_id", "poi_id", "utc_time"], how="left", suffix="_src")
    assert joined["lat_src"].null_count() == 0
    assert (joined["lat"] == joined["lat_src"]).all() and (joined["lon"] == joined["lon_src"]).all()
    assert (joined["category"] == joined["category_src"]).all()
    assert "Café" in set(checkins["category"])  # Latin-1 in the dump
    if bad_rows:
        q = pl.read_csv(out / "quarantine.csv")
        assert q["file"].to_list() == [str(path)] * bad_rows
        assert q["line"].to_list() == [(k + 1) * city.height // (bad_rows + 1) + 1 for k in range(bad_rows)]


def test_gowalla_dump_end_to_end(tmp_path: Path) -> None:
    raw, art = tmp_path / "raw", tmp_path / "art"
    raw.mkdir()
    # A city in Los Angeles (April-June: PDT = UTC-7), plus check-ins outside the California box.
    city = generate_city(seed=2, n_users=60, n_pois=300, days=90, center=(34.05, -118.25), timezone_offset_min=-420)
    ids = {p: str(i + 1000) for i, p in enumerate(sorted(set(city["poi_id"])))}
    lines = [gowalla_line(r["user_id"], r["utc_time"], r["lat"], r["lon"], ids[r["poi_id"]]) for r in city.iter_rows(named=True)]
    outside = [gowalla_line("1", datetime(2012, 4, 5, 12, k, tzinfo=UTC), 40.75, -73.98, "99") for k in range(25)]
    path = write_text(raw / "loc-gowalla_totalCheckins.txt.gz", lines + outside)
    # Categories for every location; parents only for some (the rest are filled from the leaf).
    pois = city.select("poi_id", "category", "parent_category").unique("poi_id").sort("poi_id")
    side = raw / "categories.csv"
    pl.DataFrame({
        "location_id": [ids[p] for p in pois["poi_id"]],
        "category": pois["category"],
        "parent_category": [par if k % 2 else None for k, par in enumerate(pois["parent_category"])],
    }).write_csv(side)
    summary = run_stage_data([
        "data=gowalla_ca", f"data.root={raw}", f"data.categories={side}", f"paths.artifacts={art}", "stage=data",
    ])
    out = Path(summary_dir(art, "gowalla_ca"))
    assert_summary_consistent(summary, out)
    assert summary["quarantined_rows"] == 0
    file_rows = summary["quarantine"]["files"][str(path)]["rows"]
    assert file_rows == city.height + len(outside)
    # Check-ins outside the box are cut before the protocol (not quarantined).
    assert summary["protocol"]["input_checkins"] == city.height
    checkins = pl.read_parquet(out / "checkins.parquet")
    assert "99" not in checkins["poi_id"]
    assert (checkins["local_time"] - checkins["utc_time"].dt.replace_time_zone(None) == timedelta(hours=-7)).all()
    assert checkins["category"].null_count() == 0 and checkins["parent_category"].null_count() == 0
    assert checkins["lat"].is_between(32.5, 42.0).all() and checkins["lon"].is_between(-124.5, -114.1).all()


# ---- encodings and duplicates, per line --------------------------------------------------------------


def test_one_stray_byte_does_not_turn_a_utf8_file_into_latin1(tmp_path: Path) -> None:
    """Regression: a single invalid byte made the whole file Latin-1 ("Café" -> "CafÃ©", a new venue id)."""
    cafe = tsmc_line("5", "v5", "c5", "Café", 40.7, -73.9, -240, datetime(2012, 4, 3, 18, 0, 9, tzinfo=UTC))
    lines = (TSMC_ROWS + [cafe]) * 50
    data = "".join(line + "\n" for line in lines).encode("utf-8").split(b"\n")
    data[7] = data[7].replace(b"v5", b"v\xff5") if b"v5" in data[7] else data[7] + b"\xff"
    path = tmp_path / "dataset_TSMC2014_NYC.txt"
    path.write_bytes(b"\n".join(data))
    q = Quarantine(max_bad_fraction=1.0)
    df = read_tsmc(path, q)
    assert set(df.filter(pl.col("poi_id") == "v5")["category"]) == {"Café"}
    rows = q.table().select("line", "reason").rows()
    assert rows == [(8, "encoding: not valid UTF-8 (invalid UTF-8)")]
    assert q.summary()["files"][str(path)]["encoding"] == "utf-8"
    # A declared encoding is taken as is (and recorded).
    q2 = Quarantine(max_bad_fraction=1.0)
    read_tsmc(write_text(tmp_path / "latin.txt", lines, encoding="latin-1"), q2, encoding="latin-1")
    assert q2.summary()["files"][str(tmp_path / "latin.txt")]["encoding"] == "latin-1" and q2.count() == 0


def test_exact_duplicate_lines_are_counted_and_optionally_dropped(tmp_path: Path) -> None:
    """Regression: 5,000 duplicated lines were kept without a count."""
    path = write_text(tmp_path / "dup.txt", TSMC_ROWS * 2 + TSMC_ROWS[:1])  # 4 repeats
    q = Quarantine()
    kept = read_tsmc(path, q)
    assert kept.height == 7 and q.summary()["files"][str(path)]["duplicate_lines"] == 4
    q2 = Quarantine()
    dropped = read_tsmc(path, q2, drop_duplicates=True)
    info = q2.summary()["files"][str(path)]
    assert dropped.height == 3 and info["duplicate_lines"] == 4 and info["duplicates_dropped"] is True
