"""The canonical check-in table every reader produces.

One row per check-in. Every later stage (protocol, descriptions, task samples, the DataModule)
reads only these columns, so a new data format needs only a reader.
"""

from __future__ import annotations

import polars as pl

#: Column -> dtype of the canonical check-in table. Optional facts (category, name, address) are
#: null where the source does not know them; ``traj_id`` and ``split`` are null until the
#: protocol (or the release itself) assigns them.
CHECKIN_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "poi_id": pl.String(),
    "utc_time": pl.Datetime("us", "UTC"),
    "local_time": pl.Datetime("us"),
    "lat": pl.Float64(),
    "lon": pl.Float64(),
    "category": pl.String(),
    "parent_category": pl.String(),
    "name": pl.String(),
    "address": pl.String(),
    "traj_id": pl.String(),
    "split": pl.String(),
}

SPLITS: tuple[str, ...] = ("train", "valid", "test")


def to_canonical(df: pl.DataFrame) -> pl.DataFrame:
    """Return ``df`` with exactly the canonical columns, in order, with the canonical dtypes.

    Columns the source lacks are added as nulls; extra columns are dropped.

    Args:
        df: A reader's output.

    Returns:
        The canonical check-in table.
    """
    cols = []
    for name, dtype in CHECKIN_SCHEMA.items():
        if name in df.columns:
            cols.append(pl.col(name).cast(dtype))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    return df.select(cols)


def empty_checkins() -> pl.DataFrame:
    """An empty canonical check-in table."""
    return pl.DataFrame(schema=CHECKIN_SCHEMA)
