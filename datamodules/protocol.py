"""The raw-data protocol of STHGCN / LLM4POI, applied to raw check-in dumps (TSMC2014, Gowalla,
the synthetic city). The QT-Mob release is already processed and skips this module.

Each choice, in order:

1. **Sparse users and POIs** — POIs with fewer than ``min_poi_checkins`` check-ins are dropped
   first, then users with fewer than ``min_user_checkins`` (one pass each, as STHGCN; set
   ``iterative_filter`` to repeat until both hold at once).
2. **Trajectories** — a user's check-ins, sorted by UTC time, start a new trajectory when the gap
   to the previous check-in exceeds ``max_gap_hours`` (24 h).
3. **Chronological split** — the 80 % / 90 % quantiles of all check-in times are the train/valid
   and valid/test boundaries; a trajectory goes wholly to the split in which it *starts*, so no
   trajectory is cut in two and no test trajectory starts before a train one ends its first visit.
4. **Cold start** — valid/test check-ins whose user or POI never occurs in train are dropped: the
   model cannot know an unseen id.
5. **Short trajectories** — trajectories left with fewer than ``min_traj_len`` visits are dropped
   (3 by default, as in the QT-Mob release: a next-location sample needs >= 2 visits of history, and
   a test trajectory's target is its last visit). Steps 4 and 5 repeat until stable, so every
   valid/test user and POI occurs in the final train split.

Every dropped row is counted in the returned stats; nothing disappears silently.
"""

from __future__ import annotations


import polars as pl

from datamodules.config import ProtocolConfig  # noqa: F401 (re-exported: the settings this module reads)

from datamodules.errors import DataError


def _filter_sparse(df: pl.DataFrame, cfg: ProtocolConfig) -> pl.DataFrame:
    while True:
        before = df.height
        df = df.filter(pl.len().over("poi_id") >= cfg.min_poi_checkins)
        df = df.filter(pl.len().over("user_id") >= cfg.min_user_checkins)
        if not cfg.iterative_filter or df.height == before:
            return df


def apply_protocol(checkins: pl.DataFrame, cfg: ProtocolConfig) -> tuple[pl.DataFrame, dict]:
    """Turn raw canonical check-ins into trajectories with a train/valid/test split.

    Args:
        checkins: Canonical check-ins (``traj_id``/``split`` ignored).
        cfg: Protocol settings.

    Returns:
        ``(checkins, stats)``: the kept check-ins with ``traj_id`` (``<split>_<n>``, numbered in
        time order) and ``split`` set, sorted by split, trajectory and time; and the number of rows
        each step dropped.

    Raises:
        DataError: if nothing is left after filtering.
    """
    if abs(sum(cfg.split_fractions) - 1.0) > 1e-6:
        raise DataError(f"data.protocol.split_fractions must sum to 1, got {list(cfg.split_fractions)}")
    stats: dict[str, int] = {"input_checkins": checkins.height}
    df = checkins.drop("traj_id", "split").sort("user_id", "utc_time", "poi_id")
    df = _filter_sparse(df, cfg)
    stats["dropped_sparse_users_pois"] = stats["input_checkins"] - df.height
    if df.height == 0:
        raise DataError(
            f"no check-ins left after dropping users with < {cfg.min_user_checkins} and POIs with "
            f"< {cfg.min_poi_checkins} check-ins (data.protocol); the input is too small or too sparse."
        )

    gap = pl.col("utc_time").diff().over("user_id")
    new_traj = gap.is_null() | (gap > pl.duration(seconds=int(cfg.max_gap_hours * 3600)))
    df = df.with_columns(traj_seq=new_traj.cast(pl.Int32).cum_sum().over("user_id"))
    df = df.with_columns(traj_key=pl.concat_str("user_id", "traj_seq", separator="#"))

    t_train, t_valid = (
        df.select(
            pl.col("utc_time").quantile(cfg.split_fractions[0], interpolation="lower").alias("t_train"),
            pl.col("utc_time").quantile(cfg.split_fractions[0] + cfg.split_fractions[1], interpolation="lower").alias("t_valid"),
        )
        .row(0)
    )
    start = pl.col("utc_time").min().over("traj_key")
    df = df.with_columns(
        split=pl.when(start <= t_train).then(pl.lit("train")).when(start <= t_valid).then(pl.lit("valid")).otherwise(pl.lit("test"))
    )

    # Cold start and short trajectories interact (dropping a short train trajectory can make a
    # valid/test id unseen), so both filters repeat until neither removes anything.
    stats["dropped_cold_start"] = stats["dropped_short_trajectories"] = 0
    while True:
        train = df.filter(pl.col("split") == "train")
        seen_users, seen_pois = train["user_id"].unique().implode(), train["poi_id"].unique().implode()
        n = df.height
        df = df.filter(
            (pl.col("split") == "train") | (pl.col("user_id").is_in(seen_users) & pl.col("poi_id").is_in(seen_pois))
        )
        stats["dropped_cold_start"] += n - df.height
        m = df.height
        df = df.filter(pl.len().over("traj_key") >= cfg.min_traj_len)
        stats["dropped_short_trajectories"] += m - df.height
        if df.height == n:
            break
    if df.filter(pl.col("split") == "train").height == 0:
        raise DataError("no train trajectories left after the protocol (data.protocol); the input is too small.")

    # Number trajectories per split in time order, like the release's train_0, train_1, ...
    order = pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}, return_dtype=pl.Int8)
    firsts = (
        df.group_by("traj_key")
        .agg(pl.col("split").first(), t0=pl.col("utc_time").min(), user_id=pl.col("user_id").first())
        .sort(order, "t0", "user_id")
        .with_columns(traj_id=pl.format("{}_{}", "split", pl.int_range(pl.len()).over("split")))
        .select("traj_key", "traj_id")
    )
    df = df.join(firsts, on="traj_key").sort(order, pl.col("traj_id").str.extract(r"_(\d+)$").cast(pl.Int64), "utc_time")
    stats["output_checkins"] = df.height
    return df.drop("traj_seq", "traj_key"), stats
