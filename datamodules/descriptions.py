"""The location table, generated location descriptions and user profiles — all from train data.

QT-Mob describes each POI in six lines (name/category, coordinates + geohash, address, nearby
category counts, nearest POIs, representative nearby POIs) and summarises each user (trips, top
hours, top places, top categories). The official release ships both texts; for raw data they are
generated here **from the train split only**, so no valid/test visit leaks into a prompt.
"""

from __future__ import annotations


import numpy as np
import polars as pl

from datamodules.config import DescriptionConfig  # noqa: F401 (re-exported: the settings this module reads)
from scipy.spatial import cKDTree

from datamodules.geo import geohash, haversine_km, km_to_chord, unit_xyz


def build_locations(checkins: pl.DataFrame, loc_ids: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per location, with its facts and train-split popularity.

    Args:
        checkins: Canonical check-ins with ``split``.
        loc_ids: Optional ``poi_id, loc_id`` mapping to keep (the release's own ids); otherwise
            dense ids are assigned in ``poi_id`` order.

    Returns:
        ``loc_id, poi_id, lat, lon, category, parent_category, name, address, train_visits,
        train_users``, sorted by ``loc_id``. Every POI of any split appears (after the protocol,
        all of them occur in train).
    """
    train = checkins.filter(pl.col("split") == "train")
    pop = train.group_by("poi_id").agg(train_visits=pl.len(), train_users=pl.col("user_id").n_unique())
    locs = (
        checkins.group_by("poi_id")
        .agg(
            pl.col("lat").median(),
            pl.col("lon").median(),
            *[pl.col(c).drop_nulls().mode().sort().first().alias(c) for c in ("category", "parent_category", "name", "address")],
        )
        .join(pop, on="poi_id", how="left")
        .with_columns(pl.col("train_visits", "train_users").fill_null(0).cast(pl.Int64))
    )
    if loc_ids is None:
        locs = locs.sort("poi_id").with_columns(loc_id=pl.int_range(pl.len(), dtype=pl.Int64))
    else:
        locs = locs.join(loc_ids, on="poi_id", how="left")
    cols = ["loc_id", "poi_id", "lat", "lon", "category", "parent_category", "name", "address", "train_visits", "train_users"]
    return locs.select(cols).sort("loc_id")


def _label(name: str | None, category: str | None) -> str:
    return name if name else (f"a {category}" if category else "a place")


def generate_descriptions(locations: pl.DataFrame, cfg: DescriptionConfig) -> pl.DataFrame:
    """Add ``description`` (six lines) and ``short_description`` (the first three) to the table.

    Neighbourhood facts use only locations with train visits (``train_visits > 0``), so the
    texts of a raw dataset depend on its train split alone.

    Args:
        locations: Output of :func:`build_locations`.
        cfg: Radii and list lengths.

    Returns:
        ``locations`` with the two text columns.
    """
    lat = locations["lat"].to_numpy()
    lon = locations["lon"].to_numpy()
    cats = locations["category"].fill_null("Unknown").to_list()
    labels = [_label(n, c) for n, c in zip(locations["name"].to_list(), cats)]
    visits = locations["train_visits"].to_numpy()
    known = np.flatnonzero(visits > 0)
    if known.size == 0:
        known = np.arange(len(lat))
    tree = cKDTree(unit_xyz(lat[known], lon[known]))
    xyz = unit_xyz(lat, lon)

    cat_values, cat_codes = np.unique(np.asarray(cats, dtype=object)[known].astype(str), return_inverse=True)
    near_lists = tree.query_ball_point(xyz, km_to_chord(cfg.nearby_radius_km))
    counts = np.stack([np.bincount(cat_codes[np.asarray(ix, dtype=np.int64)], minlength=len(cat_values)) for ix in near_lists])
    city_avg = counts.mean(axis=0)  # what a typical neighbourhood holds, for comparison

    k = min(cfg.n_nearest + 1, known.size)
    _, nearest = tree.query(xyz, k=k)
    nearest = np.atleast_2d(nearest)
    # Most visited first; within a radius the first n of this order are the representative POIs.
    pop_rank = np.empty(known.size, dtype=np.int64)
    pop_rank[np.lexsort((known, -visits[known]))] = np.arange(known.size)
    rep_lists = tree.query_ball_point(xyz, km_to_chord(cfg.representative_radius_km))

    hashes = geohash(lat, lon)
    names, addresses, parents = locations["name"].to_list(), locations["address"].to_list(), locations["parent_category"].to_list()
    descriptions, shorts = [], []
    for i in range(len(lat)):
        if names[i]:
            first = f'The name of this location is "{names[i]}" and its POI category is {cats[i]}'
        else:
            first = f"This location's POI category is {cats[i]}"
        first += f", belonging to the parent category {parents[i] or 'Other'}."
        second = (
            f"The geographic coordinates for this location are ({lat[i]:.6f}, {lon[i]:.6f}), "
            f"with the corresponding geohash code {hashes[i]}."
        )
        third = f"The address is {addresses[i]}." if addresses[i] else "The address is not known."
        row = counts[i]
        top = [c for c in np.argsort(-row, kind="stable")[: cfg.n_nearby_categories] if row[c] > 0]
        fourth = (
            f"The top {len(top)} nearby points-of-interest (POI) categories within {cfg.nearby_radius_km:g} km and "
            "their counts are: "
            + "; ".join(f"{cat_values[c]}, {row[c]} (city average {city_avg[c]:.0f})" for c in top)
            + "."
        )
        neigh = known[nearest[i]]
        neigh = neigh[neigh != i][: cfg.n_nearest]
        d_near = haversine_km(lat[i], lon[i], lat[neigh], lon[neigh])
        fifth = f"The {len(neigh)} nearest POIs and their distances are: " + "; ".join(
            f"{labels[j]}, distance {d:.2f} km" for j, d in zip(neigh, d_near)
        ) + "."
        cand = np.asarray(rep_lists[i], dtype=np.int64)
        cand = cand[np.argsort(pop_rank[cand])]
        rep = known[cand]
        rep = rep[rep != i][: cfg.n_representative]
        d_rep = haversine_km(lat[i], lon[i], lat[rep], lon[rep])
        sixth = f"The {len(rep)} representative (most visited) nearby POIs and their distances are: " + "; ".join(
            f"{labels[j]}, distance {d:.2f} km" for j, d in zip(rep, d_rep)
        ) + "."
        descriptions.append("\n".join([first, second, third, fourth, fifth, sixth]))
        shorts.append("\n".join([first, second, third]))
    return locations.with_columns(
        description=pl.Series(descriptions, dtype=pl.String), short_description=pl.Series(shorts, dtype=pl.String)
    )


def short_description(descriptions: pl.Series) -> pl.Series:
    """The first three lines (name/category, coordinates, address) of each description."""
    return descriptions.str.split("\n").list.head(3).list.join("\n")


def generate_profiles(checkins: pl.DataFrame, locations: pl.DataFrame, top_k: int = 5) -> pl.DataFrame:
    """User profiles from train check-ins: trips, top hours, top places, top categories.

    Args:
        checkins: Canonical check-ins with ``split`` (only train rows are used).
        locations: The location table (for names).
        top_k: Entries per list.

    Returns:
        ``user_id, profile``.
    """
    train = checkins.filter(pl.col("split") == "train").join(
        locations.select("poi_id", "loc_id", loc_name="name"), on="poi_id", how="left"
    )

    def top(by: list[str], fmt: pl.Expr, sort_by: list[str]) -> pl.DataFrame:
        return (
            train.group_by("user_id", *by)
            .agg(n=pl.len())
            .sort(["user_id", "n", *sort_by], descending=[False, True] + [False] * len(sort_by))
            .group_by("user_id", maintain_order=True)
            .head(top_k)
            .group_by("user_id", maintain_order=True)
            .agg(fmt.str.join("; "))
        )

    hour = pl.col("local_time").dt.hour()
    train = train.with_columns(hour=hour)
    hours = top(["hour"], pl.format("{}:00-{}:59 for {} times", pl.col("hour").cast(pl.String).str.zfill(2), pl.col("hour").cast(pl.String).str.zfill(2), "n").alias("hours"), ["hour"])
    places = top(
        ["loc_id", "loc_name", "lon", "lat", "category"],
        pl.format(
            "'{}' at ({}, {}) for {} times",
            pl.coalesce("loc_name", pl.format("a {}", pl.col("category").fill_null("place"))),
            pl.col("lon").round(6), pl.col("lat").round(6), "n",
        ).alias("places"),
        ["loc_id"],
    )
    categories = top(["category"], pl.format("'{}' for {} times", pl.col("category").fill_null("Unknown"), "n").alias("categories"), ["category"])
    trips = train.group_by("user_id").agg(trips=pl.col("traj_id").n_unique())
    return (
        trips.join(hours, on="user_id").join(places, on="user_id").join(categories, on="user_id")
        .sort("user_id")
        .select(
            "user_id",
            profile=pl.format(
                "The user with ID {} has taken {} trips in total.\n"
                "1. The top hours and frequencies for this user are: {}.\n"
                "2. The top locations and frequencies are: {}.\n"
                "3. The top categories and frequencies are: {}.",
                "user_id", "trips", "hours", "places", "categories",
            ),
        )
    )
