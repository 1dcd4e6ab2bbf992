"""A user's recent check-ins for ``stage=predict``: a small CSV a person writes by hand, read with
every bad row reported by line number (none dropped)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from datamodules.errors import DataError

_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M")


def parse_time(text: str):
    from datetime import datetime

    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def read_user_checkins(path: str | Path, known_locations: set[int]) -> pl.DataFrame:
    """A user's recent check-ins for ``stage=predict``: CSV with ``time`` (local, ISO) and ``loc_id``,
    optionally ``user_id``. Every bad row is reported with its line number; none is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.predict.input={path}: file not found")
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one clear message
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    missing = {"time", "loc_id"} - set(raw.columns)
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {sorted(missing)}; expected time,loc_id[,user_id], got {raw.columns}")
    if raw.is_empty():
        raise DataError(f"{path}: no check-ins")
    problems, times, locs = [], [], []
    for i, (t, loc) in enumerate(raw.select("time", "loc_id").iter_rows(), start=2):
        when = parse_time(t or "")
        if when is None:
            problems.append(f"line {i}: time {t!r} is not like 2012-04-03 18:00:09")
        try:
            loc_id = int(loc)
        except (TypeError, ValueError):
            problems.append(f"line {i}: loc_id {loc!r} is not an integer")
            loc_id = None
        if loc_id is not None and loc_id not in known_locations:
            problems.append(f"line {i}: loc_id {loc_id} is not a location of this dataset")
        times.append(when)
        locs.append(loc_id)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:5]) + more)
    users = raw["user_id"].to_list() if "user_id" in raw.columns else [None] * raw.height
    if len({u for u in users if u}) > 1:
        raise DataError(f"{path}: check-ins of several users ({sorted({u for u in users if u})[:3]}...); give one user's")
    return pl.DataFrame({"local_time": times, "loc_id": locs, "user_id": [users[0] or "anonymous"] * raw.height}).sort("local_time")
