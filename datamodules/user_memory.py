"""User memory in the prompt: the user's most visited places, as location tokens, from train visits only.

A next-location prompt shows the current trajectory (3.9 visits on average on NYC); the profile
text names places but not their tokens, so a model that copies tokens from its prompt cannot reach
the user's usual places. With ``data.samples.user_places=K`` every next-location and recovery prompt
starts with the user's K most visited train places as tokens, with their visit counts and usual hour:

    User 7 often visits POI index <a_1><b_2><c_3><d_4> (12 visits, usually around 09:00), ...

Only ``split == "train"`` visits count, so no valid or test visit (and no test target) leaks into a
prompt. A departure from the paper (off in its configs); the README's table of switches names it.
"""

from __future__ import annotations

import polars as pl


def user_memory(checkins: pl.DataFrame, codes: pl.DataFrame, k: int) -> pl.DataFrame:
    """``user_id, memory``: one sentence per user naming their top-``k`` train places (empty frame for k ≤ 0).

    Args:
        checkins: Check-ins with ``user_id, loc_id, local_time, split`` (only ``train`` rows are used).
        codes: ``loc_id, code`` token strings.
        k: Places per user, by train visits (ties: the smaller ``loc_id``).
    """
    if k <= 0:
        return pl.DataFrame(schema={"user_id": pl.String, "memory": pl.String})
    train = checkins.filter(pl.col("split") == "train").select("user_id", "loc_id", hour=pl.col("local_time").dt.hour())
    per_place = (
        train.group_by("user_id", "loc_id")
        .agg(visits=pl.len(), hour=pl.col("hour").mode().min())  # the usual hour; ties: the earliest
        .sort(["user_id", "visits", "loc_id"], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .head(k)
        .join(codes.select("loc_id", "code"), on="loc_id", how="left")
    )
    noun = pl.when(pl.col("visits") == 1).then(pl.lit("visit")).otherwise(pl.lit("visits"))
    item = pl.format("POI index {} ({} {}, usually around {}:00)", "code", "visits", noun, pl.col("hour").cast(pl.String).str.zfill(2))
    return (
        per_place.filter(pl.col("code").is_not_null())
        .group_by("user_id", maintain_order=True)
        .agg(items=item)
        .select("user_id", memory=pl.format("User {} often visits {}.\n", "user_id", pl.col("items").list.join(", ")))
    )


__all__ = ["user_memory"]
