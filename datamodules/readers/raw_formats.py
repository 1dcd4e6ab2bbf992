"""Readers for the raw public check-in dumps: Foursquare TSMC2014 (NYC, TKY) and SNAP Gowalla.

Both are read line by line (see :mod:`datamodules.readers.lines`) and validated with vectorised
Polars expressions; malformed rows go to the :class:`~datamodules.errors.Quarantine`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from datamodules.errors import DataError, Quarantine, require_timezone
from datamodules.readers.lines import partition, read_lines, split_fields
from datamodules.schema import to_canonical

TSMC_FORMAT = (
    "the raw Foursquare TSMC2014 dump: 8 tab-separated columns (user id, venue id, venue category id, "
    "venue category name, latitude, longitude, timezone offset in minutes, UTC time like "
    "'Tue Apr 03 18:00:09 +0000 2012'), no header"
)
GOWALLA_FORMAT = (
    "SNAP's Gowalla check-ins (loc-gowalla_totalCheckins.txt[.gz]): 5 tab-separated columns "
    "(user, ISO-8601 UTC time, latitude, longitude, location id), no header"
)


def _coordinate_checks() -> list[tuple[pl.Expr, str]]:
    return [
        (pl.col("lat").is_null(), "latitude is not a number"),
        (pl.col("lon").is_null(), "longitude is not a number"),
        (~pl.col("lat").is_between(-90, 90) | pl.col("lat").is_nan(), "latitude outside [-90, 90]"),
        (~pl.col("lon").is_between(-180, 180) | pl.col("lon").is_nan(), "longitude outside [-180, 180]"),
    ]


def _id_checks() -> list[tuple[pl.Expr, str]]:
    return [
        (pl.col("user_id").is_null() | (pl.col("user_id") == ""), "empty user id"),
        (pl.col("poi_id").is_null() | (pl.col("poi_id") == ""), "empty location id"),
    ]


def read_tsmc(path: str | Path, quarantine: Quarantine, encoding: str = "auto", drop_duplicates: bool = False) -> pl.DataFrame:
    """Read a raw TSMC2014 file (``dataset_TSMC2014_NYC.txt`` or ``_TKY.txt``).

    Args:
        path: The file.
        quarantine: Receives malformed rows (and the file's encoding and duplicate-line count).
        encoding: ``auto`` (see :func:`~datamodules.readers.lines.decode`) or a declared codec.
        drop_duplicates: Drop exact repeats of a line (always counted).

    Returns:
        Canonical check-ins (no trajectory or split yet); ``category`` is the venue category name.
    """
    path = Path(path)
    info: dict = {}
    lines, unterminated = read_lines(path, TSMC_FORMAT, encoding=encoding, info=info, drop_duplicates=drop_duplicates)
    quarantine.note_file(path, **info)
    names = ["user_id", "poi_id", "category_id", "category", "lat_s", "lon_s", "tz_s", "utc_s"]
    df = split_fields(lines, names, "\t", unterminated).with_columns(
        lat=pl.col("lat_s").cast(pl.Float64, strict=False),
        lon=pl.col("lon_s").cast(pl.Float64, strict=False),
        tz_offset=pl.col("tz_s").cast(pl.Int32, strict=False),
        utc_time=pl.col("utc_s").str.strptime(pl.Datetime("us", "UTC"), "%a %b %d %H:%M:%S %z %Y", strict=False),
    )
    good, bad = partition(
        df,
        [
            *_id_checks(),
            (pl.col("utc_time").is_null(), "unparsable UTC time (expected e.g. 'Tue Apr 03 18:00:09 +0000 2012')"),
            (pl.col("tz_offset").is_null(), "timezone offset is not an integer number of minutes"),
            (pl.col("tz_offset").abs() > 14 * 60, "timezone offset outside +-14 h"),
            *_coordinate_checks(),
        ],
    )
    quarantine.add(bad, path, df.height)
    good = good.with_columns(
        local_time=(pl.col("utc_time") + pl.duration(minutes=pl.col("tz_offset"))).dt.replace_time_zone(None),
        category=pl.when(pl.col("category") == "").then(None).otherwise(pl.col("category")),
    )
    return to_canonical(good)


def read_gowalla(
    path: str | Path,
    quarantine: Quarantine,
    bbox: list[float] | None = None,
    categories: str | Path | None = None,
    timezone: str | None = None,
    encoding: str = "utf-8",
    drop_duplicates: bool = False,
) -> pl.DataFrame:
    """Read SNAP's Gowalla check-ins, optionally cut to a bounding box (``encoding`` and
    ``drop_duplicates`` as in :func:`read_tsmc`).

    Args:
        path: ``loc-gowalla_totalCheckins.txt`` or its ``.gz``.
        quarantine: Receives malformed rows.
        bbox: ``[min_lat, min_lon, max_lat, max_lon]``; check-ins outside are not part of the
            dataset (they are counted, not quarantined).
        categories: Optional CSV side file with columns ``location_id,category`` and optionally
            ``parent_category`` (SNAP ships no categories).
        timezone: IANA zone for local time (e.g. ``America/Los_Angeles``); UTC when None.

    Returns:
        Canonical check-ins.
    """
    path = Path(path)
    if timezone:
        require_timezone(timezone, "data.timezone")
    info: dict = {}
    lines, unterminated = read_lines(path, GOWALLA_FORMAT, encoding=encoding, info=info, drop_duplicates=drop_duplicates)
    quarantine.note_file(path, **info)
    names = ["user_id", "utc_s", "lat_s", "lon_s", "poi_id"]
    df = split_fields(lines, names, "\t", unterminated).with_columns(
        lat=pl.col("lat_s").cast(pl.Float64, strict=False),
        lon=pl.col("lon_s").cast(pl.Float64, strict=False),
        utc_time=pl.col("utc_s").str.strptime(pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%SZ", strict=False),
    )
    good, bad = partition(
        df,
        [
            *_id_checks(),
            (pl.col("utc_time").is_null(), "unparsable time (expected ISO-8601 like 2010-10-19T23:55:27Z)"),
            *_coordinate_checks(),
        ],
    )
    quarantine.add(bad, path, df.height)
    if bbox is not None:
        min_lat, min_lon, max_lat, max_lon = bbox
        good = good.filter(pl.col("lat").is_between(min_lat, max_lat) & pl.col("lon").is_between(min_lon, max_lon))
    local = pl.col("utc_time").dt.convert_time_zone(timezone) if timezone else pl.col("utc_time")
    good = good.with_columns(local_time=local.dt.replace_time_zone(None))
    if categories is not None:
        good = good.join(read_category_side_file(categories), on="poi_id", how="left")
    return to_canonical(good)


def read_category_side_file(path: str | Path) -> pl.DataFrame:
    """Read an optional ``location_id,category[,parent_category]`` CSV."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: category side file not found. Expected a CSV with columns location_id,category[,parent_category].")
    try:
        side = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse as CSV ({exc}).") from None
    if not {"location_id", "category"} <= set(side.columns):
        raise DataError(f"{path}: needs columns location_id,category[,parent_category]; found {side.columns}.")
    keep = ["location_id", "category"] + (["parent_category"] if "parent_category" in side.columns else [])
    return side.select(keep).rename({"location_id": "poi_id"}).unique("poi_id", keep="first")
