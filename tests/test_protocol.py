"""Unit tests of the raw-data protocol (``datamodules.protocol.apply_protocol``) on hand-made frames.

Each test builds a small canonical check-in table whose expected outcome can be worked out by hand:
sparse users/POIs, 24-h trajectory gaps, the chronological 80/10/10 split, cold-start removal,
short trajectories, trajectory ids, and the row accounting of ``stats``.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from datamodules.errors import DataError
from datamodules.config import ConfigError
from datamodules.protocol import ProtocolConfig, apply_protocol
from datamodules.readers.synthetic import generate_city
from datamodules.schema import CHECKIN_SCHEMA, SPLITS, to_canonical

T0 = datetime(2012, 4, 2, 8, 0, 0, tzinfo=timezone.utc)
#: No sparse filter and no short-trajectory filter: isolates the step under test.
LOOSE = ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=1)
DROP_KEYS = ("dropped_sparse_users_pois", "dropped_cold_start", "dropped_short_trajectories")

Row = tuple[str, str, datetime]


def frame(rows: list[Row]) -> pl.DataFrame:
    """Canonical check-ins from ``(user_id, poi_id, utc_time)`` rows (fixed coordinates)."""
    utc = pl.Series("utc_time", [t for _, _, t in rows], dtype=pl.Datetime("us", "UTC"))
    df = pl.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "poi_id": [p for _, p, _ in rows],
            "utc_time": utc,
            "local_time": utc.dt.replace_time_zone(None) - timedelta(hours=4),
            "lat": [40.75] * len(rows),
            "lon": [-73.98] * len(rows),
        },
        schema_overrides={"user_id": pl.String, "poi_id": pl.String},
    )
    return to_canonical(df)


def trip(user: str, start: datetime, pois: list[str], step_h: float = 1.0) -> list[Row]:
    """One trajectory: ``pois`` visited ``step_h`` hours apart from ``start``."""
    return [(user, p, start + timedelta(hours=k * step_h)) for k, p in enumerate(pois)]


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def assert_rows_conserved(inp: pl.DataFrame, out: pl.DataFrame, stats: dict) -> None:
    """Rows in == rows out + every dropped count; nothing disappears silently."""
    assert stats["input_checkins"] == inp.height
    assert stats["output_checkins"] == out.height
    assert inp.height == out.height + sum(stats[k] for k in DROP_KEYS)
    assert all(stats[k] >= 0 for k in DROP_KEYS)


def traj_starts(out: pl.DataFrame) -> pl.DataFrame:
    return out.group_by("traj_id").agg(pl.col("split").first(), t0=pl.col("utc_time").min(), n=pl.len())


def one_user_ten_trips() -> list[Row]:
    """User ``u``: 10 trajectories three days apart (5 visits each, 8 on day 21)."""
    rows: list[Row] = []
    for k in range(10):
        pois = ["a", "b", "c", "d", "e"] + (["a", "b", "c"] if k == 7 else [])
        rows += trip("u", day(3 * k), pois)
    return rows


@pytest.fixture(scope="module")
def city_result() -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    city = generate_city(seed=0)
    out, stats = apply_protocol(city, ProtocolConfig())
    return city, out, stats


# ---- 1. sparse users and POIs ----------------------------------------------------------------------


def sparse_rows() -> list[Row]:
    rows: list[Row] = []
    # Four heavy users, one 3-visit trajectory a day for 30 days: 90 check-ins each.
    for h in range(4):
        for d in range(30):
            rows += trip(f"h{h}", day(d) + timedelta(minutes=10 * h), ["a", "b", "c"])
    # POI p9: 9 check-ins (dropped); POI p10: exactly 10 (kept). Both early, inside h1/h2's days.
    rows += [("h1", "p9", day(d) + timedelta(hours=5)) for d in range(9)]
    rows += [("h2", "p10", day(d) + timedelta(hours=5)) for d in range(10)]
    # User u9: 9 check-ins (dropped); user u10: exactly 10 (kept). Three a day, on known POIs.
    rows += [("u9", "abc"[k % 3], day(k // 3) + timedelta(hours=2, minutes=k)) for k in range(9)]
    rows += [("u10", "abc"[k % 3], day(k // 3) + timedelta(hours=2, minutes=k)) for k in range(10)]
    return rows


def test_sparse_users_and_pois_are_dropped_and_counted() -> None:
    inp = frame(sparse_rows())
    out, stats = apply_protocol(inp, ProtocolConfig())
    assert stats["dropped_sparse_users_pois"] == 9 + 9  # p9's rows and u9's rows
    assert "p9" not in out["poi_id"] and "u9" not in out["user_id"]
    assert "p10" in out["poi_id"] and "u10" in out["user_id"]  # the thresholds are >= 10
    assert_rows_conserved(inp, out, stats)


def test_sparse_filter_is_one_pass_unless_iterative() -> None:
    rows = sparse_rows()
    # POI q: 10 check-ins, one of them by u9x, a user with 9 check-ins. One pass keeps q (it had
    # 10 when POIs were filtered); the iterative filter drops it once u9x is gone.
    rows += [("h3", "q", day(d) + timedelta(hours=5)) for d in range(9)]
    rows += [("u9x", "a", day(d) + timedelta(hours=3)) for d in range(8)] + [("u9x", "q", day(8) + timedelta(hours=4))]
    inp = frame(rows)
    once, stats_once = apply_protocol(inp, ProtocolConfig())
    iterative, stats_iter = apply_protocol(inp, ProtocolConfig(iterative_filter=True))
    assert "q" in once["poi_id"] and "u9x" not in once["user_id"]
    assert "q" not in iterative["poi_id"]
    assert stats_iter["dropped_sparse_users_pois"] == stats_once["dropped_sparse_users_pois"] + 9
    assert_rows_conserved(inp, once, stats_once)
    assert_rows_conserved(inp, iterative, stats_iter)


# ---- 2. trajectories at 24-h gaps ---------------------------------------------------------------


@pytest.mark.parametrize(("gap_h", "n_traj"), [(23, 1), (24, 1), (25, 2)])
def test_gap_over_24h_starts_a_new_trajectory(gap_h: float, n_traj: int) -> None:
    rows = [("u", "a", day(0)), ("u", "a", day(0) + timedelta(hours=1)), ("u", "a", day(0) + timedelta(hours=1 + gap_h))]
    out, stats = apply_protocol(frame(rows), LOOSE)
    assert out.height == 3
    assert out["traj_id"].n_unique() == n_traj
    # The first two check-ins (1 h apart) always share a trajectory.
    first_two = out.sort("utc_time")["traj_id"].head(2)
    assert first_two.n_unique() == 1


def test_max_gap_hours_is_configurable() -> None:
    rows = trip("u", day(0), ["a", "b"]) + trip("u", day(0) + timedelta(hours=8), ["c", "d"])
    out_24, _ = apply_protocol(frame(rows), LOOSE)
    out_6, _ = apply_protocol(frame(rows), ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=1, max_gap_hours=6))
    assert out_24["traj_id"].n_unique() == 1
    assert out_6["traj_id"].n_unique() == 2


# ---- 3. chronological split -----------------------------------------------------------------------


def test_chronological_80_10_10_split_by_trajectory_start() -> None:
    # 53 check-ins; the lower 80 % quantile is the 42nd time (day 21, 14:00) and the 90 % one the
    # 47th (day 24, 11:00): trajectories starting on days 0..21 are train, day 24 valid, day 27 test.
    inp = frame(one_user_ten_trips())
    out, stats = apply_protocol(inp, LOOSE)
    starts = traj_starts(out).sort("t0")
    assert starts["split"].to_list() == ["train"] * 8 + ["valid", "test"]
    # The day-21 trajectory runs past the train/valid boundary and still goes wholly to train.
    day21 = starts.filter(pl.col("t0") == day(21))
    assert day21["split"].to_list() == ["train"] and day21["n"].to_list() == [8]
    assert out.height == inp.height and stats["dropped_cold_start"] == 0
    assert_rows_conserved(inp, out, stats)


def test_splits_are_ordered_in_time_on_the_synthetic_city(city_result) -> None:
    city, out, stats = city_result
    starts = traj_starts(out)
    first = {s: starts.filter(pl.col("split") == s)["t0"].min() for s in SPLITS}
    last = {s: starts.filter(pl.col("split") == s)["t0"].max() for s in SPLITS}
    assert all(first[s] is not None for s in SPLITS)  # every split is populated
    assert last["train"] <= first["valid"]
    assert last["valid"] <= first["test"]
    share = out.filter(pl.col("split") == "train").height / out.height
    assert 0.7 < share < 0.95
    # Each trajectory belongs to one user and one split.
    per_traj = out.group_by("traj_id").agg(pl.col("split").n_unique(), pl.col("user_id").n_unique())
    assert per_traj["split"].max() == 1 and per_traj["user_id"].max() == 1
    assert_rows_conserved(city, out, stats)


# ---- 4. cold start --------------------------------------------------------------------------------


def test_unseen_users_and_pois_are_dropped_from_valid_and_test() -> None:
    rows = one_user_ten_trips()
    rows += [("u", "z", day(27) + timedelta(hours=5))]  # POI z occurs only in u's test trajectory
    rows += trip("late", day(27), ["a", "b", "c"])  # user "late" occurs only in the test period
    inp = frame(rows)
    out, stats = apply_protocol(inp, LOOSE)
    assert stats["dropped_cold_start"] == 1 + 3
    assert "z" not in out["poi_id"] and "late" not in out["user_id"]
    # u's own last trajectory (valid/test) is kept whole.
    later = out.filter(pl.col("split") != "train")
    assert later.height == 5 and set(later["user_id"]) == {"u"} and later["utc_time"].min() == day(27)
    assert_rows_conserved(inp, out, stats)


def test_valid_and_test_ids_occur_in_the_final_train_split() -> None:
    """Cold start is judged against the train split that is *returned*.

    User B and POI Z occur in train only in a 2-visit trajectory, which the short-trajectory step
    removes; B's later trajectory through Z must then not survive in valid/test.
    """
    rows: list[Row] = []
    for d in range(8):
        rows += trip("A", day(2 * d), ["a", "b", "c"])
    rows += trip("B", day(3), ["Z", "a"])  # train, but too short
    rows += trip("B", day(15), ["Z", "a", "b"])  # valid
    rows += trip("A", day(17), ["a", "b", "c"])  # test
    inp = frame(rows)
    out, stats = apply_protocol(inp, ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=3))
    train = out.filter(pl.col("split") == "train")
    later = out.filter(pl.col("split") != "train")
    assert set(later["user_id"]) <= set(train["user_id"]), "valid/test user unseen in the returned train split"
    assert set(later["poi_id"]) <= set(train["poi_id"]), "valid/test POI unseen in the returned train split"
    assert_rows_conserved(inp, out, stats)


def test_valid_and_test_ids_occur_in_train_on_the_synthetic_city(city_result) -> None:
    _, out, _ = city_result
    train = out.filter(pl.col("split") == "train")
    later = out.filter(pl.col("split") != "train")
    assert later.height > 0
    assert set(later["user_id"]) <= set(train["user_id"])
    assert set(later["poi_id"]) <= set(train["poi_id"])


# ---- 5. short trajectories ------------------------------------------------------------------------


def test_short_trajectories_are_dropped_and_counted() -> None:
    rows = one_user_ten_trips()
    rows += trip("u", day(1) + timedelta(hours=12), ["a", "b"])  # a 2-visit train trajectory
    inp = frame(rows)
    out, stats = apply_protocol(inp, ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=3))
    assert stats["dropped_short_trajectories"] == 2
    assert out.group_by("traj_id").len()["len"].min() >= 3
    assert out.height == inp.height - 2
    assert_rows_conserved(inp, out, stats)


def test_cold_start_can_make_a_trajectory_short() -> None:
    rows = one_user_ten_trips()
    # Replace the test trajectory by a 3-visit one through a POI never seen in train: after the
    # cold-start step it has 2 visits and the short-trajectory step drops it.
    rows = [r for r in rows if r[2] < day(27)] + trip("u", day(27), ["a", "z", "b"])
    inp = frame(rows)
    out, stats = apply_protocol(inp, ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=3))
    assert stats["dropped_cold_start"] == 1
    assert stats["dropped_short_trajectories"] == 2
    assert "test" not in out["split"]
    assert_rows_conserved(inp, out, stats)


@pytest.mark.parametrize("min_len", [1, 3, 6])
def test_min_traj_len_is_respected(city_result, min_len: int) -> None:
    city, _, _ = city_result
    out, stats = apply_protocol(city, ProtocolConfig(min_traj_len=min_len))
    assert out.group_by("traj_id").len()["len"].min() >= min_len
    assert_rows_conserved(city, out, stats)


# ---- trajectory ids, order, schema ----------------------------------------------------------------


def test_traj_ids_are_split_and_number_in_time_order(city_result) -> None:
    _, out, _ = city_result
    assert dict(out.schema) == CHECKIN_SCHEMA
    assert out["traj_id"].null_count() == 0 and out["split"].null_count() == 0
    assert all(re.fullmatch(r"(train|valid|test)_\d+", t) for t in out["traj_id"].unique())
    assert (out["traj_id"].str.extract(r"^(\w+?)_\d+$") == out["split"]).all()
    starts = traj_starts(out).with_columns(num=pl.col("traj_id").str.extract(r"_(\d+)$").cast(pl.Int64))
    for split in SPLITS:
        part = starts.filter(pl.col("split") == split).sort("num")
        assert part["num"].to_list() == list(range(part.height))  # train_0 .. train_{n-1}, no gaps
        assert part["t0"].is_sorted()  # numbered by start time
    # Rows come sorted by split, trajectory number and time.
    order = out.with_columns(
        s=pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}),
        num=pl.col("traj_id").str.extract(r"_(\d+)$").cast(pl.Int64),
    )
    assert order.select("s", "num", "utc_time").equals(order.sort("s", "num", "utc_time").select("s", "num", "utc_time"))


def test_input_traj_id_and_split_are_ignored() -> None:
    inp = frame(one_user_ten_trips()).with_columns(traj_id=pl.lit("junk"), split=pl.lit("test"))
    out, _ = apply_protocol(inp, LOOSE)
    assert set(out["split"]) == {"train", "valid", "test"}
    assert "junk" not in out["traj_id"]


# ---- errors ---------------------------------------------------------------------------------------


def test_everything_too_sparse_is_a_data_error() -> None:
    rows = trip("u", day(0), ["a", "b", "c"]) + trip("v", day(1), ["a", "b", "c"])
    with pytest.raises(DataError, match="no check-ins left"):
        apply_protocol(frame(rows), ProtocolConfig())


def test_empty_input_is_a_data_error() -> None:
    with pytest.raises(DataError):
        apply_protocol(pl.DataFrame(schema=CHECKIN_SCHEMA), ProtocolConfig())


def test_only_short_trajectories_is_a_data_error() -> None:
    rows = [r for k in range(10) for r in trip("u", day(2 * k), ["a", "b"])]
    with pytest.raises(DataError, match="no train trajectories"):
        apply_protocol(frame(rows), ProtocolConfig(min_user_checkins=1, min_poi_checkins=1, min_traj_len=3))


def test_split_fractions_must_sum_to_one() -> None:
    """A bad split is a config error, raised when the settings are made (before any stage runs)."""
    with pytest.raises(ConfigError, match="split_fractions"):
        ProtocolConfig(split_fractions=(0.8, 0.1, 0.2))


def test_rows_are_conserved_with_every_drop_kind() -> None:
    rows = sparse_rows()
    # User s: two 5-visit train trajectories and a 2-visit one (too short).
    rows += trip("s", day(0), list("abcab")) + trip("s", day(3), list("abcab")) + trip("s", day(6), ["a", "b"])
    # User "late": 12 check-ins, all after the train period (cold start).
    rows += [r for d in (27, 28, 29) for r in trip("late", day(d), list("abca"))]
    inp = frame(rows)
    out, stats = apply_protocol(inp, ProtocolConfig())
    assert all(stats[k] > 0 for k in DROP_KEYS), stats
    assert_rows_conserved(inp, out, stats)
