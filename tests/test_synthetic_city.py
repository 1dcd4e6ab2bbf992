"""Tests for the seeded synthetic city (``datamodules.readers.synthetic``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from datamodules.readers.synthetic import CATEGORIES, generate_city
from datamodules.schema import CHECKIN_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def city() -> pl.DataFrame:
    """The default city, generated once for the whole module."""
    return generate_city()


def test_deterministic_for_a_seed() -> None:
    assert generate_city(seed=3).equals(generate_city(seed=3))


def test_same_seed_same_city_in_another_process() -> None:
    """Python salts str hashes per process (PYTHONHASHSEED): iterating a set of strings while
    drawing from the rng once gave each process its own categories and names."""
    code = "from datamodules.readers.synthetic import generate_city; print(generate_city(seed=3, n_pois=80, n_users=10, days=10).hash_rows().sum())"
    sums = {
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(h)},
                       capture_output=True, text=True, check=True).stdout.strip()
        for h in (1, 2, 3)
    }
    assert len(sums) == 1, sums


def test_different_seeds_differ(city: pl.DataFrame) -> None:
    other = generate_city(seed=1)
    assert not city.equals(other)
    # Not just shuffled times: the places themselves differ.
    assert set(city["poi_id"]) != set(other["poi_id"])


def test_schema_is_canonical(city: pl.DataFrame) -> None:
    assert dict(city.schema) == CHECKIN_SCHEMA
    assert list(city.columns) == list(CHECKIN_SCHEMA)
    assert city["traj_id"].null_count() == city.height
    assert city["split"].null_count() == city.height


def test_sorted_by_user_then_time(city: pl.DataFrame) -> None:
    assert city.equals(city.sort(["user_id", "utc_time"], maintain_order=True))


def test_size_and_speed() -> None:
    t0 = time.perf_counter()
    df = generate_city()
    elapsed = time.perf_counter() - t0
    assert 8_000 <= df.height <= 20_000
    assert elapsed < 2.0  # well under 1 s in practice; slack for slow CI machines


def test_coordinates_within_radius(city: pl.DataFrame) -> None:
    lat0, lon0 = 40.75, -73.98
    lat = np.radians(city["lat"].to_numpy())
    lon = np.radians(city["lon"].to_numpy())
    # Haversine distance to the centre.
    a = (np.sin((lat - math.radians(lat0)) / 2) ** 2
         + math.cos(math.radians(lat0)) * np.cos(lat) * np.sin((lon - math.radians(lon0)) / 2) ** 2)
    d_km = 2 * 6371.0088 * np.arcsin(np.sqrt(a))
    assert d_km.max() <= 8.0


def test_every_user_active_and_pois_mostly_visited(city: pl.DataFrame) -> None:
    per_user = city.group_by("user_id").len()
    assert per_user.height == 60
    assert per_user["len"].min() >= 10
    assert city["poi_id"].n_unique() >= 0.8 * 300
    # Like real Foursquare users, they check in on a fair share of days (not all: runs of active
    # days separated by silent ones give trajectories of a few visits), several times per active day.
    days = city.group_by("user_id", pl.col("local_time").dt.date()).len()
    assert days.group_by("user_id").len()["len"].median() >= 0.25 * 120
    assert days["len"].mean() >= 2.5


def test_hour_histogram_has_morning_and_evening_peaks(city: pl.DataFrame) -> None:
    hour = city["local_time"].dt.hour()
    night = int(hour.is_between(2, 5).sum())
    morning = int(hour.is_between(8, 10).sum())
    evening = int(hour.is_between(18, 22).sum())
    afternoon = int(hour.is_between(15, 16).sum())
    assert morning > 10 * max(night, 1)
    assert evening > 10 * max(night, 1)
    # Peaks, not a plateau: both beat the mid-afternoon lull (per hour).
    assert morning / 3 > afternoon / 2 and evening / 5 > afternoon / 2


def test_categories_and_parents(city: pl.DataFrame) -> None:
    for col in ("category", "parent_category", "name", "poi_id", "user_id"):
        assert city[col].null_count() == 0, col
    pairs = city.select("category", "parent_category").unique()
    for cat, parent in pairs.iter_rows():
        assert CATEGORIES[cat][0] == parent
    assert city["parent_category"].n_unique() >= 8
    # A POI keeps one category, one position, one name.
    per_poi = city.group_by("poi_id").agg(pl.col("category", "lat", "lon", "name").n_unique())
    assert (per_poi.select(pl.exclude("poi_id")) == 1).to_numpy().all()


def test_category_and_location_correlate(city: pl.DataFrame) -> None:
    pois = city.unique("poi_id").select("parent_category", "lat", "lon")
    # Offices and homes live in different neighbourhoods, so their centroids are apart.
    office = pois.filter(pl.col("parent_category") == "Professional & Other Places")
    home = pois.filter(pl.col("parent_category") == "Residence")
    d_lat = (office["lat"].mean() - home["lat"].mean()) * 111.32
    d_lon = (office["lon"].mean() - home["lon"].mean()) * 111.32 * math.cos(math.radians(40.75))
    assert math.hypot(d_lat, d_lon) > 0.5


def test_local_time_is_utc_plus_offset(city: pl.DataFrame) -> None:
    for df, offset in (
        (city, -240),
        (generate_city(seed=2, n_users=3, n_pois=30, days=5, timezone_offset_min=540), 540),
    ):
        expected = pl.col("utc_time").dt.replace_time_zone(None) + pl.duration(minutes=offset)
        assert df.select((pl.col("local_time") == expected).all()).item()


def test_seconds_are_random(city: pl.DataFrame) -> None:
    assert city["local_time"].dt.second().n_unique() == 60


def test_repeat_visits_to_top_poi(city: pl.DataFrame) -> None:
    counts = city.group_by("user_id", "poi_id").len()
    top_share = counts.group_by("user_id").agg(pl.col("len").max() / pl.col("len").sum())["len"]
    assert top_share.min() >= 0.15
    # The top place of most users is their home or workplace.
    top_parent = (
        counts.sort("len", descending=True).group_by("user_id").first()
        .join(city.unique("poi_id").select("poi_id", "parent_category"), on="poi_id")
    )
    homeish = top_parent["parent_category"].is_in(
        ["Residence", "Professional & Other Places", "College & University"]
    )
    assert homeish.mean() >= 0.9


def test_multi_visit_trajectories_after_24h_cut(city: pl.DataFrame) -> None:
    trajs = (
        city.with_columns(
            new=(pl.col("utc_time").diff().over("user_id") > pl.duration(hours=24)).fill_null(True)
        )
        .with_columns(traj=pl.col("new").cum_sum().over("user_id"))
        .group_by("user_id", "traj")
        .len()
    )
    assert trajs.height >= 2 * 60
    assert (trajs["len"] >= 2).mean() >= 0.9


def test_small_cities_work() -> None:
    df = generate_city(seed=5, n_users=2, n_pois=2, days=2)
    assert dict(df.schema) == CHECKIN_SCHEMA
    assert df.height > 0


@pytest.mark.parametrize("kwargs", [{"n_users": 0}, {"n_pois": 1}, {"days": 0}, {"radius_km": 0.0}])
def test_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_city(**kwargs)


def test_the_quickstart_city_is_calibrated_to_nyc(tmp_path) -> None:
    """The default run's city has NYC's difficulty for the count baselines, for user_time and for the GRU (each
    Acc@1 within +-0.05 of NYC's, every test case), not the routine of the generator's defaults
    (user_most_frequent ~0.75, user_time ~0.77), and its users try new places nearly as often as NYC's."""
    from benchmarks.calibrate_city import NYC, NYC_GRU, RULE, city_stats, meets

    stats = city_stats(["experiment=quickstart"], tmp_path, gru=True)
    assert stats["test cases"] > 100
    assert len(RULE) == 4  # most_popular, markov, user_most_frequent, user_time; the GRU joins with gru_rule
    assert meets(stats, gru_rule=True), {key: stats[key] for key in (*RULE, *NYC_GRU)}
    # 0.73 against NYC's 0.56 (the session-40 city 0.77, the earlier 0.85, the generator's defaults 0.97): nearer,
    # not yet alike. Visits per trajectory: 4.7 against 5.89 (6.0 before session 43): a user checks in at 60 % of
    # their stops (checkin_rate), which is what brought the GRU to NYC's level (benchmarks/README.md, "The
    # synthetic city"). The margins are a few cases: the knobs were picked to the edge.
    revisit, visits = "revisit share (target in the user's train places)", "visits per trajectory"
    assert abs(stats[revisit] - NYC[revisit]) <= 0.2, stats
    assert abs(stats[visits] - NYC[visits]) <= 1.3, stats


def _hour_spread(df: pl.DataFrame) -> float:
    """Mean over (user, place) pairs with >= 8 weekday visits of the standard deviation of their hour."""
    hour = pl.col("local_time").dt.hour() + pl.col("local_time").dt.minute() / 60
    weekday = df.filter(pl.col("local_time").dt.weekday() <= 5)
    per_pair = weekday.group_by("user_id", "poi_id").agg(n=pl.len(), sd=hour.std())
    return float(per_pair.filter(pl.col("n") >= 8)["sd"].mean())


def test_day_shift_moves_whole_days_within_the_day() -> None:
    """``day_shift_h`` makes the hour of a habit vary from day to day (a workplace at 9 h one day, at 11 h
    another) while every day still fits 05:30-02:30."""
    kwargs = {"seed": 4, "n_users": 20, "days": 60}
    still, wandering = generate_city(**kwargs), generate_city(**kwargs, day_shift_h=(2.0, 3.0))
    assert _hour_spread(wandering) > _hour_spread(still) + 0.7, (_hour_spread(still), _hour_spread(wandering))
    hour = wandering["local_time"].dt.hour() + wandering["local_time"].dt.minute() / 60
    assert not hour.is_between(2.6, 5.4).any()  # nothing between 02:30 and 05:30 (times carry +-30 s; the day loop
    # clamps too, so the shift's own bound is tested in test_a_day_shift_is_a_truncated_normal_that_keeps_the_day_whole)
    assert hour.is_between(5.4, 5.6).mean() < 0.01, "no pile of days at 05:30 (a clipped shift put 18 % there)"
    # Shifted, not cut short: about as many check-ins.
    assert abs(wandering.height - still.height) <= 0.1 * still.height


def test_a_day_shift_is_a_truncated_normal_that_keeps_the_day_whole() -> None:
    """The shift of a day's stops keeps every stop within 05:30-02:30, and is drawn again rather than clipped, so
    that days do not pile up at the bounds (a clipped shift put 18 % of a city's active days at exactly 05:30)."""
    import random

    from datamodules.readers.synthetic import _day_shift

    gauss = random.Random(0).gauss
    day = [7.0, 9.0, 12.5, 22.0]  # room for shifts from -1.5 h to +4.5 h
    shifts = np.array([_day_shift(day, 6.0, gauss) for _ in range(5000)])
    assert shifts.min() >= -1.5 and shifts.max() <= 4.5
    assert np.mean((shifts < -1.49) | (shifts > 4.49)) < 0.01, "no pile at the bounds"
    assert shifts.std() > 1.2  # spread over the room left (uniform over 6 h: 1.7)
    small = np.array([_day_shift(day, 0.5, gauss) for _ in range(2000)])
    assert abs(small.std() - 0.5) < 0.05, "well inside the room the shift is the plain normal"
    assert _day_shift([5.0, 27.0], 3.0, gauss) == 0.0, "a day longer than the window is not shifted"


def test_stop_jitter_moves_stops_on_their_own_and_may_swap_them() -> None:
    """``stop_jitter_h`` gives every stop its own deviation, so a place's usual successor is less certain
    (neighbouring stops swap), and every day still fits 05:30-02:30."""
    kwargs = {"seed": 4, "n_users": 20, "days": 60}

    def usual_successor_share(df: pl.DataFrame) -> float:
        """Of a user's same-day moves from a place, the share going to that place's most frequent successor."""
        moves = (df.sort("user_id", "local_time").with_columns(day=pl.col("local_time").dt.date())
                 .with_columns(nxt=pl.col("poi_id").shift(-1).over("user_id", "day")).drop_nulls("nxt"))
        per_place = moves.group_by("user_id", "poi_id", "nxt").len().group_by("user_id", "poi_id").agg(
            top=pl.col("len").max(), n=pl.col("len").sum())
        return float(per_place["top"].sum() / per_place["n"].sum())

    still, jittered = generate_city(**kwargs), generate_city(**kwargs, stop_jitter_h=(2.0, 3.0))
    assert usual_successor_share(jittered) < usual_successor_share(still) - 0.05  # 0.567 -> 0.482
    assert _hour_spread(jittered) > _hour_spread(still) + 0.7
    hour = jittered["local_time"].dt.hour() + jittered["local_time"].dt.minute() / 60
    assert not hour.is_between(2.6, 5.4).any()


def test_popularity_makes_users_share_places() -> None:
    """With ``popularity`` some venues draw many users (favourites and explorations alike), as busy
    stations and famous bars do; without it the users' places spread evenly by distance."""
    kwargs = {"seed": 4, "n_users": 40, "days": 40}

    def busiest(df: pl.DataFrame) -> tuple[float, float]:
        """Users per place of the 10 busiest public places, and the 20 busiest places' share of check-ins."""
        public = df.filter(pl.col("parent_category") != "Residence")
        users = public.group_by("poi_id").agg(pl.col("user_id").n_unique())["user_id"].sort(descending=True)
        visits = public.group_by("poi_id").len()["len"].sort(descending=True)
        return float(users.head(10).mean()), float(visits.head(20).sum() / visits.sum())

    even, popular = busiest(generate_city(**kwargs)), busiest(generate_city(**kwargs, popularity=2.0))
    assert popular[0] > 1.5 * even[0] and popular[1] > 1.5 * even[1], (even, popular)  # 9.4, 0.32 -> 18.0, 0.61


def test_checkin_rate_keeps_a_seeded_share_of_the_same_stops() -> None:
    """``checkin_rate`` keeps each stop with that probability from a generator of its own: the kept check-ins
    are a subset of the full city's (the same places), about that share of them, the same for the same seed;
    1 is the full city and leaves the data fingerprint alone."""
    kwargs = {"seed": 4, "n_users": 20, "days": 60}
    full, half = generate_city(**kwargs), generate_city(**kwargs, checkin_rate=0.5)
    assert generate_city(**kwargs, checkin_rate=1.0).equals(full)
    assert generate_city(**kwargs, checkin_rate=0.5).equals(half)
    key = ["user_id", "poi_id", "utc_time"]
    assert half.select(key).join(full.select(key), on=key, how="anti").is_empty()  # only stops of the full city
    assert 0.45 < half.height / full.height < 0.55, half.height / full.height
    assert half.select("poi_id", "name").unique().join(full.select("poi_id", "name").unique(), on="poi_id").filter(
        pl.col("name") != pl.col("name_right")).is_empty()  # the same places
    from datamodules.config import CityConfig, ConfigError
    from pipeline.paths import data_fingerprint
    from tests.conftest import compose_run

    with pytest.raises(ConfigError, match="checkin_rate"):
        CityConfig(checkin_rate=0.0)
    # neutral at 1: the cities (and data folders) made before the knob keep their fingerprint
    base = data_fingerprint(compose_run(["experiment=smoke"]))  # a city at rate 1 (the quick start's has 0.6)
    assert data_fingerprint(compose_run(["experiment=smoke", "data.city.checkin_rate=1.0"])) == base
    assert data_fingerprint(compose_run(["experiment=smoke", "data.city.checkin_rate=0.5"])) != base


def test_shared_routes_make_strangers_share_moves() -> None:
    """``shared_routes``: a try of somewhere new often goes to the city's usual next place from where the user
    is, so more of the moves between public places are made by several users (what a city-wide ``markov``
    reads), with no venue drawing everyone; 0 is the city as before (no draw is made) and leaves the data
    fingerprint alone."""
    kwargs = {"seed": 4, "n_users": 40, "days": 40, "explore": (0.5, 0.8)}

    def shared_moves(df: pl.DataFrame) -> float:
        """Share of the consecutive same-day moves between two different public places whose (from, to) pair
        at least two users make."""
        day = pl.col("local_time").dt.date()
        moves = (df.sort("user_id", "utc_time").with_columns(prev=pl.col("poi_id").shift().over("user_id", day),
                                                               prev_cat=pl.col("parent_category").shift().over("user_id", day))
                 .filter(pl.col("prev").is_not_null() & (pl.col("prev") != pl.col("poi_id"))
                         & (pl.col("prev_cat") != "Residence") & (pl.col("parent_category") != "Residence")))
        users = moves.group_by("prev", "poi_id").agg(n=pl.col("user_id").n_unique())
        return float(moves.join(users, on=["prev", "poi_id"])["n"].ge(2).mean())

    plain, routed = generate_city(**kwargs), generate_city(**kwargs, shared_routes=0.9)
    assert generate_city(**kwargs, shared_routes=0.9).equals(routed)
    # Off, the city is the one generated before the knob existed (this digest is the parent commit's, 48861c8):
    # the knob makes no draw at 0.
    import hashlib

    before = generate_city(seed=3, n_users=10, n_pois=80, days=10, explore=(0.5, 0.8), popularity=1.0, shared_routes=0.0)
    assert hashlib.sha256(before.write_csv().encode()).hexdigest() == \
        "8b028f168f96a494c0fbda52eb278301dd188b408e0d3cafc342cc4a56f217ad"
    assert shared_moves(routed) > 1.5 * shared_moves(plain), (shared_moves(plain), shared_moves(routed))
    busiest = lambda df: float(df.group_by("poi_id").len()["len"].max() / df.height)  # noqa: E731
    assert busiest(routed) < 2 * busiest(plain), (busiest(plain), busiest(routed))  # no venue for everyone
    from datamodules.config import CityConfig, ConfigError
    from pipeline.paths import data_fingerprint
    from tests.conftest import compose_run

    with pytest.raises(ConfigError, match="shared_routes"):
        CityConfig(shared_routes=1.5)
    base = data_fingerprint(compose_run(["experiment=smoke"]))
    assert data_fingerprint(compose_run(["experiment=smoke", "data.city.shared_routes=0"])) == base
    assert data_fingerprint(compose_run(["experiment=smoke", "data.city.shared_routes=0.5"])) != base


@pytest.mark.parametrize("kwargs", [{"day_shift_h": (-1.0, 1.0)}, {"day_shift_h": (3.0, 1.0)}, {"stop_jitter_h": (-1.0, 0.0)},
                                    {"popularity": -0.5}, {"checkin_rate": 1.5}, {"shared_routes": -0.1}])
def test_rejects_bad_habit_knobs(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_city(n_users=2, n_pois=10, days=2, **kwargs)


def test_calibration_candidates_are_ranked_by_the_rule(tmp_path, monkeypatch) -> None:
    """calibrate_city.py --candidates: every candidate is scored at each seed, a candidate meets the rule only when
    the four baselines are within +-0.05 of NYC at every seed and on the mean, and those that meet it come first."""
    import benchmarks.calibrate_city as cal

    nyc = dict(cal.NYC)
    stats = {  # candidate "a": within at both seeds; "b": nearer on the mean, but markov 0.06 off at seed 1
        ("a", 42): {**nyc, "markov Acc@1": 0.08}, ("a", 1): {**nyc, "markov Acc@1": 0.09, "revisit share (target in the user's train places)": 0.8},
        ("b", 42): {**nyc, "markov Acc@1": 0.16}, ("b", 1): {**nyc, "markov Acc@1": 0.0538},
    }
    calls, with_gru = [], []

    def fake(overrides: list[str], artifacts=None, gru=False) -> dict[str, float]:
        calls.append(overrides)
        with_gru.append(gru)
        name = next(o.split("=")[1] for o in overrides if o.startswith("data.city.name_tag"))
        return stats[name, int(next(o.split("=")[1] for o in overrides if o.startswith("seed=")))]

    monkeypatch.setattr(cal, "city_stats", fake)
    rows = cal.score_candidates(["name_tag=a explore=0.4,0.7", "name_tag=b"], "quickstart", [42, 1])
    assert [r["city"] for r in rows] == ["name_tag=a explore=0.4,0.7", "name_tag=b"] and [r["meets"] for r in rows] == [True, False]
    assert rows[1]["distance"] < rows[0]["distance"], "b is nearer on the mean, yet a meets the rule"
    assert rows[0]["mean"]["markov Acc@1"] == pytest.approx(0.085)
    assert calls[0] == ["experiment=quickstart", "seed=42", "data.city.name_tag=a", "data.city.explore=[0.4,0.7]"]
    assert cal.distance(nyc) == 0.0
    assert with_gru == [False] * 4 and "gru Acc@1" not in rows[0]["mean"]


def test_the_gru_is_a_column_of_the_candidates_not_part_of_the_rule(monkeypatch, capsys) -> None:
    import benchmarks.calibrate_city as cal

    far = {**cal.NYC, "gru Acc@1": 0.40}  # the four baselines exactly NYC's, the GRU far above
    monkeypatch.setattr(cal, "city_stats", lambda overrides, artifacts=None, gru=False: far)
    rows = cal.score_candidates(["explore=0.4,0.7"], "quickstart", [42, 1], gru=True)
    assert rows[0]["meets"] and rows[0]["mean"]["gru Acc@1"] == pytest.approx(0.40) and rows[0]["distance"] == 0.0
    cal.print_ranked(rows, [42, 1], gru=True)
    table = capsys.readouterr().out
    assert "| gru |" in table and "| 0.181 |" in table and "| 0.4 |" in table
    cal.print_ranked([], [42], gru=True)  # an empty list still shows the column
    assert "| gru |" in capsys.readouterr().out


def test_the_gru_joins_the_rule_with_gru_rule(monkeypatch, capsys) -> None:
    """--gru-rule: a city whose four baselines are NYC's but whose GRU is 0.06 above NYC's meets the four-baseline
    rule and fails the five-baseline one, at one seed or on the mean alone; the GRU then counts in the distance."""
    import benchmarks.calibrate_city as cal

    near, far = {**cal.NYC, "gru Acc@1": 0.181 + 0.04}, {**cal.NYC, "gru Acc@1": 0.181 + 0.06}
    assert cal.meets(near, far) and cal.meets(near, gru_rule=True) and not cal.meets(near, far, gru_rule=True)
    assert cal.distance(far) == 0.0 and cal.distance(far, gru_rule=True) == pytest.approx(0.06)
    per_seed = {42: near, 1: far}
    monkeypatch.setattr(cal, "city_stats", lambda overrides, artifacts=None, gru=False: (
        gru or pytest.fail("gru_rule scores the GRU")) and per_seed[int(next(o[5:] for o in overrides if o.startswith("seed=")))])
    rows = cal.score_candidates(["explore=0.4,0.7"], "quickstart", [42, 1], gru_rule=True)
    assert not rows[0]["meets"] and rows[0]["distance"] == pytest.approx(0.05)
    per_seed[1] = near
    assert cal.score_candidates(["explore=0.4,0.7"], "quickstart", [42, 1], gru_rule=True)[0]["meets"]
    cal.print_ranked(rows, [42, 1], gru_rule=True, per_seed=True)
    table = capsys.readouterr().out
    assert "user_time, gru within" in table and "| seed 1 | | | " in table and "| 0.241 |" in table


def test_search_draws_reproducible_cities_within_the_ranges() -> None:
    """calibrate_city.py --search: the same seed draws the same cities, each a valid data.city setting inside
    SEARCH's ranges, with the quick start's sizes; some draws leave the stop jitter off."""
    import random

    import benchmarks.calibrate_city as cal
    from datamodules.config import CityConfig

    assert cal.draw_city(random.Random(7)) == cal.draw_city(random.Random(7))
    rng = random.Random(3)
    drawn = [cal.draw_city(rng) for _ in range(60)]
    assert len(set(drawn)) == 60
    off = 0
    for line in drawn:
        kv = dict(part.split("=", 1) for part in line.split())
        assert set(kv) == set(cal.SEARCH)
        city = CityConfig(**{k: [float(x) for x in v.split(",")] if "," in v else float(v) if "." in v else int(v)
                             for k, v in kv.items()})  # validates the ranges
        for key, how in cal.SEARCH.items():
            value = getattr(city, key)
            if key == "days":  # as many check-ins per user at every rate
                assert value == cal.scaled_days(how, city.checkin_rate)
            elif isinstance(how, (int, float)):
                assert value == how, key
            elif isinstance(how[0], (int, float)):
                assert value in how, key
            elif key == "stop_jitter_h" and tuple(value) == (0.0, 0.0):
                off += 1
            else:
                (lo_min, lo_max), (w_min, w_max) = how
                low, high = value
                assert lo_min - 0.005 <= low <= lo_max + 0.005, (key, value)
                cap = cal.CAP.get(key, math.inf)
                assert min(low + w_min, cap) - 0.011 <= high <= min(low + w_max, cap) + 0.011, (key, value)
    assert 0.5 * cal.JITTER_OFF * len(drawn) <= off <= min(1.5 * cal.JITTER_OFF, 0.95) * len(drawn), off


def test_search_writes_the_best_draws_as_candidates(tmp_path, monkeypatch, capsys) -> None:
    """calibrate_city.py --search N --out F: N draws scored at one seed, the --keep best (by the rule, then the
    distance) written to F as candidate lines that --candidates reads back."""
    import random

    import benchmarks.calibrate_city as cal

    def fake(overrides: list[str], artifacts=None, gru=False) -> dict[str, float]:
        assert "seed=42" in overrides
        explore = float(next(o for o in overrides if o.startswith("data.city.explore=")).split("[")[1].split(",")[0])
        return {**cal.NYC, "markov Acc@1": cal.NYC["markov Acc@1"] + 0.1 * explore}  # lower explore: nearer NYC

    monkeypatch.setattr(cal, "city_stats", fake)
    out = tmp_path / "drawn.txt"
    monkeypatch.setattr(sys, "argv", ["calibrate_city.py", "--search", "6", "--keep", "3", "--out", str(out), "--search-seed", "1"])
    cal.main()
    assert "| NYC release |" in capsys.readouterr().out
    rng = random.Random(1)
    draws = [cal.draw_city(rng) for _ in range(6)]
    explore = lambda line: float(line.split("explore=")[1].split(",")[0])  # noqa: E731
    written = [ln.split("#")[0].strip() for ln in out.read_text().splitlines() if not ln.startswith("#")]
    assert written == sorted(draws, key=explore)[:3], "the 3 nearest NYC, best first"
    # --candidates reads the file back: the same three cities, each scored at every seed
    scored = []
    monkeypatch.setattr(cal, "score_candidates",
                        lambda lines, experiment, seeds, gru=False, gru_rule=False: scored.append((lines, seeds)) or [])
    monkeypatch.setattr(sys, "argv", ["calibrate_city.py", "--candidates", str(out), "--seeds", "42", "1"])
    cal.main()
    assert scored == [(written, [42, 1])]


@pytest.mark.parametrize("argv", [["--search", "0", "--out", "x.txt"], ["--search", "3"], ["--out", "x.txt"],
                                  ["--search", "3", "--out", "/no/such/folder/x.txt"], ["--search", "3", "--keep", "0", "--out", "x.txt"],
                                  ["--search", "3", "--out", "x.txt", "--candidates", "y.txt"], ["--candidates", "y.txt", "--city", "explore=0.4,0.7"],
                                  ["--search", "3", "--out", "x.txt", "--per-seed"]])
def test_search_rejects_unusable_arguments(argv: list[str], monkeypatch, tmp_path) -> None:
    import benchmarks.calibrate_city as cal

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cal, "city_stats", lambda *a, **k: pytest.fail("scored despite bad arguments"))
    monkeypatch.setattr(sys, "argv", ["calibrate_city.py", *argv])
    with pytest.raises(SystemExit) as exc:
        cal.main()
    assert exc.value.code == 2
