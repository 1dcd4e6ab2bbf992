"""Reader for the official QT-Mob preprocessed release (e.g. ``foursquare_NYC``).

The release folder holds ``trips_{train,valid,test}.csv`` (columns ``user_id,trips,traj_id``; a
``trips`` cell is a Python-style list literal of ``'lon,lat,YYYY-MM-DD HH:MM:SS'`` strings in local
time), ``loc2id`` (a pickle ``{(lon, lat): int}``), ``prompts/<id>.txt`` (one description per
location), ``user_profile.csv`` (``|``-separated) and the released RQ-VAE index JSON.

Nothing here evaluates or unpickles arbitrary objects: list cells are parsed with regular
expressions and ``loc2id`` with an unpickler that only admits dicts, tuples and numbers.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import polars as pl

from datamodules.errors import DataError, Quarantine, require_timezone
from datamodules.readers.lines import partition, read_lines
from datamodules.schema import to_canonical

SPLIT_FILES = {"train": "trips_train.csv", "valid": "trips_valid.csv", "test": "trips_test.csv"}
RELEASE_FORMAT = (
    "the QT-Mob release folder: trips_{train,valid,test}.csv (columns user_id,trips,traj_id), "
    "loc2id (pickle of {(lon, lat): id}), prompts/<id>.txt, user_profile.csv"
)
# A whole cell: [ 'item', 'item', ... ] with items free of quotes.
_LIST_CELL = r"^\[\s*(?:'[^']*'\s*(?:,\s*'[^']*'\s*)*)?\]$"
_ITEM = r"'([^']*)'"
# A whole row: user id, the double-quoted list cell, trajectory id.
_ROW = r'^([^,"]*),"([^"]*)",([^,"]*)$'
_NAME_LINE = re.compile(
    r'^The name of this location is "(?P<name>.*)" and its POI category is (?P<category>.*?), '
    r"belonging to the parent category (?P<parent>.*?)\.?$"
)
_COORD_LINE = re.compile(r"coordinates for this location are \((?P<lat>[-0-9.eE+]+), (?P<lon>[-0-9.eE+]+)\)")
_ADDRESS_LINE = re.compile(r"^The address is (?P<address>.*?)\.?$")


class _NumbersOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: a dict of tuples of floats needs none."""

    def find_class(self, module: str, name: str):  # noqa: D102
        raise pickle.UnpicklingError(f"loc2id may only hold numbers, tuples and dicts; found {module}.{name}")


def read_loc2id(path: Path) -> pl.DataFrame:
    """Read ``loc2id`` safely into a frame ``lon, lat, loc_id``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Expected {RELEASE_FORMAT}.")
    try:
        mapping = _NumbersOnlyUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:  # any unpickling failure is a data problem, reported as such
        raise DataError(f"{path}: not a loc2id pickle of {{(lon, lat): id}} ({exc}).") from None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, tuple) and len(k) == 2 and isinstance(v, int) for k, v in mapping.items()
    ):
        raise DataError(f"{path}: expected a dict {{(lon, lat): int}}.")
    keys = list(mapping)
    return pl.DataFrame(
        {
            "lon": [float(k[0]) for k in keys],
            "lat": [float(k[1]) for k in keys],
            "loc_id": [mapping[k] for k in keys],
        },
        schema={"lon": pl.Float64, "lat": pl.Float64, "loc_id": pl.Int64},
    )


def _read_trips_csv(path: Path, split: str, quarantine: Quarantine) -> pl.DataFrame:
    """One ``trips_<split>.csv`` exploded to one row per visit (``line`` = file line number).

    The file is read line by line (a release row never spans lines), so that a defect in one row —
    an extra field, a NUL byte, invalid UTF-8, a cut last line — quarantines that row only.
    """
    lines, unterminated = read_lines(path, RELEASE_FORMAT)
    header = lines.filter(pl.col("line") == 1)["text"].to_list()
    if not header or [c.strip() for c in header[0].split(",")] != ["user_id", "trips", "traj_id"]:
        found = header[0][:80] if header else "(no header line)"
        raise DataError(f"{path}: line 1 must be the header 'user_id,trips,traj_id'; found {found!r}. Expected {RELEASE_FORMAT}.")
    lines = lines.filter(pl.col("line") > 1)
    if lines.height == 0:
        raise DataError(f"{path}: no trajectories. Expected {RELEASE_FORMAT}.")
    last_line = lines["line"].max()
    rows = lines.with_columns(
        user_id=pl.col("text").str.extract(_ROW, 1).str.strip_chars(),
        trips=pl.col("text").str.extract(_ROW, 2),
        traj_id=pl.col("text").str.extract(_ROW, 3).str.strip_chars(),
        row=pl.col("line"),
        reason=pl.when(pl.col("text").str.contains("\x00", literal=True))
        .then(pl.lit("NUL byte in line"))
        .when(pl.col("text").str.contains("\ufffd", literal=True))
        .then(pl.lit("encoding: not valid UTF-8 (invalid UTF-8)"))
        .when(~pl.col("text").str.contains(_ROW) & (pl.col("line") == last_line) & pl.lit(unterminated))
        .then(pl.lit("truncated last line"))
        .when(~pl.col("text").str.contains(_ROW))
        .then(pl.lit('row is not user_id,"[...]",traj_id'))
        .otherwise(None),
    )
    good_rows, bad_rows = partition(
        rows,
        [
            (pl.col("user_id") == "", "empty user id"),
            (pl.col("traj_id") == "", "empty trajectory id"),
            (~pl.col("trips").str.contains(_LIST_CELL), "trips cell is not a list literal of quoted strings"),
            (~pl.col("trips").str.contains(_ITEM), "trajectory without visits"),
        ],
    )
    visits = (
        good_rows.with_columns(item=pl.col("trips").str.extract_all(_ITEM))
        .explode("item")
        .filter(pl.col("item").is_not_null())
        .with_columns(
            item=pl.col("item").str.strip_chars("'"),
            pos=pl.int_range(pl.len()).over("row"),
        )
        .with_columns(parts=pl.col("item").str.split(","))
        .with_columns(
            lon=pl.col("parts").list.get(0, null_on_oob=True).cast(pl.Float64, strict=False),
            lat=pl.col("parts").list.get(1, null_on_oob=True).cast(pl.Float64, strict=False),
            local_time=pl.col("parts")
            .list.get(2, null_on_oob=True)
            .str.strptime(pl.Datetime("us"), "%Y-%m-%d %H:%M:%S", strict=False),
            text=pl.col("item"),
            reason=pl.when(pl.col("parts").list.len() != 3)
            .then(pl.lit("visit is not 'lon,lat,YYYY-MM-DD HH:MM:SS'"))
            .otherwise(None),
        )
    )
    good, bad_visits = partition(
        visits,
        [
            (pl.col("lon").is_null(), "longitude is not a number"),
            (pl.col("lat").is_null(), "latitude is not a number"),
            (~pl.col("lat").is_between(-90, 90), "latitude outside [-90, 90]"),
            (~pl.col("lon").is_between(-180, 180), "longitude outside [-180, 180]"),
            (pl.col("local_time").is_null(), "unparsable time (expected YYYY-MM-DD HH:MM:SS)"),
        ],
    )
    # The budget counts trajectory lines (a line with one bad visit counts once); the summary also
    # reports the visits dropped.
    quarantine.add(pl.concat([bad_rows, bad_visits]), path, lines.height)
    return good.select(
        "line",
        user_id=pl.col("user_id").str.strip_chars(),
        traj_id=pl.col("traj_id").str.strip_chars(),
        split=pl.lit(split),
        pos="pos",
        lon="lon",
        lat="lat",
        local_time="local_time",
    )


def parse_description(text: str) -> dict:
    """Facts stated in a release description (name, category, parent, coordinates, address)."""
    out: dict = {"name": None, "category": None, "parent_category": None, "lat": None, "lon": None, "address": None}
    lines = text.splitlines()
    if lines and (m := _NAME_LINE.match(lines[0].strip())):
        out.update(name=m["name"] or None, category=m["category"], parent_category=m["parent"])
    if (m := _COORD_LINE.search(text)) is not None:
        out.update(lat=float(m["lat"]), lon=float(m["lon"]))
    for line in lines[2:3]:
        if m := _ADDRESS_LINE.match(line.strip()):
            out["address"] = m["address"] or None
    return out


def read_release_descriptions(root: Path, folder: str = "prompts") -> pl.DataFrame:
    """Read ``<root>/<folder>/<id>.txt`` into ``loc_id, description`` plus the parsed facts.

    Files are read as bytes in one loop; the facts are extracted with vectorised regular
    expressions (the same patterns :func:`parse_description` uses for a single text).
    """
    directory = root / folder
    if not directory.is_dir():
        raise DataError(f"{directory}: folder not found. Expected {RELEASE_FORMAT}.")
    ids, texts = [], []
    with os.scandir(directory) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.partition(".")
            if ext == "txt" and stem.isdigit():
                with open(entry.path, "rb") as fh:
                    ids.append(int(stem))
                    texts.append(fh.read().decode("utf-8", errors="replace").strip())
    if not ids:
        raise DataError(f"{directory}: no <id>.txt descriptions. Expected {RELEASE_FORMAT}.")
    df = pl.DataFrame({"loc_id": ids, "description": texts}, schema={"loc_id": pl.Int64, "description": pl.String})
    lines = pl.col("description").str.split("\n")
    first = lines.list.get(0, null_on_oob=True).str.strip_chars()
    second = lines.list.get(1, null_on_oob=True)
    third = lines.list.get(2, null_on_oob=True).str.strip_chars()
    return (
        df.with_columns(
            name=first.str.extract(_NAME_LINE.pattern, 1),
            category=first.str.extract(_NAME_LINE.pattern, 2),
            parent_category=first.str.extract(_NAME_LINE.pattern, 3),
            lat=second.str.extract(_COORD_LINE.pattern, 1).cast(pl.Float64, strict=False),
            lon=second.str.extract(_COORD_LINE.pattern, 2).cast(pl.Float64, strict=False),
            address=third.str.extract(_ADDRESS_LINE.pattern, 1),
        )
        .with_columns(pl.when(pl.col(c) == "").then(None).otherwise(pl.col(c)).alias(c) for c in ("name", "address"))
        .sort("loc_id")
    )


def read_release_profiles(root: Path) -> pl.DataFrame:
    """Read ``user_profile.csv`` into ``user_id, profile`` (the release's own profile text)."""
    path = root / "user_profile.csv"
    if not path.is_file():
        raise DataError(f"{path}: file not found. Expected {RELEASE_FORMAT}.")
    try:
        df = pl.read_csv(path, separator="|", infer_schema=False, quote_char='"')
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse as '|'-separated CSV ({str(exc).splitlines()[0]}).") from None
    if not {"user_id", "prompt"} <= set(df.columns):
        raise DataError(f"{path}: needs columns user_id|prompt; found {df.columns}.")
    return df.select(pl.col("user_id").str.strip_chars(), profile=pl.col("prompt"))


def read_qtmob_release(
    root: str | Path, quarantine: Quarantine, timezone: str = "America/New_York", prompts: str = "prompts"
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read the whole release.

    Args:
        root: The release folder.
        quarantine: Receives malformed rows.
        timezone: IANA zone of the release's local times (used to derive UTC).
        prompts: The description folder (``prompts`` or ``prompts_refined``).

    Returns:
        ``(checkins, descriptions)``: canonical check-ins with the release's trajectories and splits
        (``poi_id`` = the loc2id id as a string), and the parsed descriptions keyed by ``loc_id``.
    """
    root = Path(root)
    require_timezone(timezone, "data.timezone")
    if not root.is_dir():
        raise DataError(f"{root}: folder not found. Expected {RELEASE_FORMAT}. Set data.root or data.download=true.")
    loc2id = read_loc2id(root / "loc2id")
    descriptions = read_release_descriptions(root, prompts)
    frames = []
    for split, name in SPLIT_FILES.items():
        visits = _read_trips_csv(root / name, split, quarantine)
        # Float keys: the same decimal strings parse to the same doubles the pickle holds.
        joined = visits.join(loc2id, on=["lon", "lat"], how="left")
        unknown = joined.filter(pl.col("loc_id").is_null())
        if unknown.height:
            quarantine.add(
                unknown.select(
                    "line",
                    reason=pl.lit("location (lon, lat) not in loc2id"),
                    content=pl.format("{},{}", "lon", "lat"),
                ),
                root / name,
                0,
            )
        frames.append(joined.filter(pl.col("loc_id").is_not_null()))
    visits = pl.concat(frames).with_columns(
        utc_time=pl.col("local_time")
        .dt.replace_time_zone(timezone, ambiguous="earliest", non_existent="null")
        .dt.convert_time_zone("UTC")
    )
    # A local time inside a daylight-saving gap names no instant: quarantine it, never a null UTC.
    gap = visits.filter(pl.col("utc_time").is_null())
    for split, name in SPLIT_FILES.items():
        part = gap.filter(pl.col("split") == split)
        if part.height:
            quarantine.add(
                part.select(
                    "line",
                    reason=pl.lit(f"local time does not exist in {timezone} (daylight-saving gap)"),
                    content=pl.col("local_time").cast(pl.String),
                ),
                root / name,
                0,
            )
    visits = visits.filter(pl.col("utc_time").is_not_null())
    facts = descriptions.select("loc_id", "category", "parent_category", "name", "address")
    checkins = visits.join(facts, on="loc_id", how="left").with_columns(poi_id=pl.col("loc_id").cast(pl.String))
    order = pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}, return_dtype=pl.Int8)
    checkins = checkins.sort(order, "line", "pos")
    return to_canonical(checkins), descriptions
