"""User memory in the prompt: the user's most visited places, as location tokens, from train visits only.

A next-location prompt shows the current trajectory (3.9 visits on average on NYC); the profile
text names places but not their tokens, so a model that copies tokens from its prompt cannot reach
the user's usual places. With ``data.samples.user_places=K`` every next-location and recovery prompt
starts with the user's K most visited train places as tokens, with their visit counts and usual hour:

    User 7 often visits POI index <a_1><b_2><c_3><d_4> (12 visits, usually around 09:00), ...

Only ``split == "train"`` visits count, so no valid or test visit (and no test target) leaks into a
prompt. The memory of a trajectory also leaves that trajectory out (leave-one-trajectory-out, as the
visit hints do): a train sample's memory would otherwise count the very visits it asks for, and name
its target far more often than a test sample's does (measured on NYC: the target in the memory's top 5
for 0.563 of train visits with its own trajectory counted, 0.462 without it, 0.415 at test). The
memory is therefore per trajectory, not per user. A departure from the paper (off in its configs); the
README's table of switches names it.
"""

from __future__ import annotations

import polars as pl


def user_memory(checkins: pl.DataFrame, codes: pl.DataFrame, k: int, visits: pl.DataFrame | None = None) -> pl.DataFrame:
    """``traj_id, memory``: per trajectory, one sentence naming its user's top-``k`` train places, the
    trajectory's own visits left out (an empty frame for k ≤ 0; no row for a trajectory whose user has no
    other train visit).

    Args:
        checkins: Check-ins with ``traj_id, user_id, loc_id, local_time, split`` (only ``train`` rows count).
        codes: ``loc_id, code`` token strings.
        k: Places per trajectory, by train visits (ties: the smaller ``loc_id``); the usual hour is the
            most frequent hour of those visits (ties: the earliest).
        visits: The trajectories to write a memory for (``traj_id, user_id``), when they are not
            ``checkins``' (``stage=predict``'s check-ins: a trajectory outside ``checkins`` loses nothing, so its
            ``traj_id`` must not be one of ``checkins``' train trajectories).
    """
    if k <= 0:
        return pl.DataFrame(schema={"traj_id": pl.String, "memory": pl.String})
    train = checkins.filter(pl.col("split") == "train").select(
        "user_id", "traj_id", "loc_id", hour=pl.col("local_time").dt.hour().cast(pl.Int16))
    trajectories = (checkins if visits is None else visits).select("traj_id", "user_id").unique("traj_id", maintain_order=True)
    by_hour = (
        trajectories.join(train.group_by("user_id", "loc_id", "hour").agg(n=pl.len()), on="user_id", how="inner")
        .join(train.group_by("traj_id", "loc_id", "hour").agg(own=pl.len()), on=["traj_id", "loc_id", "hour"], how="left")
        .with_columns(n=pl.col("n") - pl.col("own").fill_null(0))
        .filter(pl.col("n") > 0)
    )
    per_place = (
        by_hour.sort(["traj_id", "loc_id", "n", "hour"], descending=[False, False, True, False])
        .group_by("traj_id", "user_id", "loc_id", maintain_order=True)
        .agg(visits=pl.col("n").sum(), hour=pl.col("hour").first())  # the usual hour; ties: the earliest
        .sort(["traj_id", "visits", "loc_id"], descending=[False, True, False])
        .group_by("traj_id", maintain_order=True)
        .head(k)
        .join(codes.select("loc_id", "code"), on="loc_id", how="inner", maintain_order="left")
    )
    noun = pl.when(pl.col("visits") == 1).then(pl.lit("visit")).otherwise(pl.lit("visits"))
    item = pl.format("POI index {} ({} {}, usually around {}:00)", "code", "visits", noun, pl.col("hour").cast(pl.String).str.zfill(2))
    memory = (
        per_place.group_by("traj_id", "user_id", maintain_order=True)
        .agg(items=item)
        .select("traj_id", memory=pl.format("User {} often visits {}.\n", "user_id", pl.col("items").list.join(", ")))
    )
    return trajectories.select("traj_id").join(memory, on="traj_id", how="inner", maintain_order="left")


__all__ = ["user_memory"]
