"""Visit hints: beside each visit's time, the places the user usually visits at that hour, as tokens.

A model that reads a trajectory must otherwise learn from a few thousand samples which of the
user's places fits 18:00 rather than 09:00. With ``data.samples.visit_hints=K`` every visit's time
is followed by the user's K most visited train places within ``visit_hint_hours`` hours of that
time of day:

    Tue 18:00 (usually <a_1><b_2><c_3><d_4> <a_5><b_0><c_7><d_1>) <a_1><b_2><c_3><d_4>.

The hint of a visit to predict sits in its response prefix (it is part of the time), so the model
reads it before it writes the code, at training and at test alike.

With ``data.samples.visit_hint_counts=true`` each place carries how many of those train visits it has,
so that the model can tell a habit (×12) from a one-off (×1), as the counts of ``user_time`` do:

    Tue 18:00 (usually <a_1><b_2><c_3><d_4> ×12 <a_5><b_0><c_7><d_1> ×1) <a_1><b_2><c_3><d_4>.

(SmolLM2 reads " ×" as one token: a count costs 1 + its digits.)

With ``data.samples.visit_hint_count_first=true`` as well, each count comes before its place:

    Tue 18:00 (usually ×12 <a_1><b_2><c_3><d_4> ×1 <a_5><b_0><c_7><d_1>) <a_1><b_2><c_3><d_4>.

A causal model sees a place's tokens only with what precedes them: written after its count, a place's
positions already hold how strong the habit is when the model attends to them to copy it, instead of
the model having to join a later count back to the place before it.

Only ``split == "train"`` visits count, and a train visit's hint leaves out its own trajectory
(leave-one-trajectory-out): a hint never counts the visit it stands beside, so it is no more
accurate at training than at test, where the visits are never train visits. The rule is that of
the ``user_time`` baseline's main term (``lightning_modules/user_time.py``), written where the
model can use it together with the trajectory. A departure from the paper (off in its configs).
"""

from __future__ import annotations

import polars as pl


def visit_hints(history: pl.DataFrame, codes: pl.DataFrame, k: int, hours: int = 1,
                visits: pl.DataFrame | None = None, counts: bool = False, count_first: bool = False) -> pl.DataFrame:
    """``traj_id, utc_time, hint``: the hint text of every visit (``""`` where the user has no train
    visit at that time of day; an empty frame for ``k <= 0``).

    Args:
        history: Check-ins with ``traj_id, user_id, loc_id, local_time, split`` (only ``train`` rows count).
        codes: ``loc_id, code`` token strings.
        k: Places per hint, most visited first (ties: the smaller ``loc_id``).
        hours: Half-width of the time-of-day window, in hours (circular: 23:00 is next to 00:00).
        visits: The visits to hint (``traj_id, user_id, utc_time, local_time``); default: ``history``'s.
        counts: Follow each place with `` ×n``, its train visits in the window (its own trajectory's left out).
        count_first: With ``counts``, write ``×n <code>`` (the count before its place) instead.
    """
    if k <= 0:
        return pl.DataFrame(schema={"traj_id": pl.String, "utc_time": pl.Datetime("us", "UTC"), "hint": pl.String})
    hour = pl.col("local_time").dt.hour().cast(pl.Int16)
    train = history.filter(pl.col("split") == "train").select("user_id", "traj_id", "loc_id", hour=hour)

    def around(keys: list[str]) -> pl.DataFrame:
        """Train visits per ``keys`` and place, for every query hour whose window holds them."""
        counted = train.group_by(*keys, "hour", "loc_id").agg(n=pl.len())
        shifted = [counted.with_columns(at=((pl.col("hour") + d) % 24).cast(pl.Int16)) for d in range(-hours, hours + 1)]
        return pl.concat(shifted).group_by(*keys, "at", "loc_id").agg(pl.col("n").sum())

    per_user = around(["user_id"])
    own = around(["traj_id"]).rename({"n": "own"})
    query = (history if visits is None else visits).select("traj_id", "user_id", "utc_time", at=hour).unique(["traj_id", "utc_time"], maintain_order=True)
    ranked = (
        query.join(per_user, on=["user_id", "at"], how="inner")
        .join(own, on=["traj_id", "at", "loc_id"], how="left")
        .with_columns(n=pl.col("n") - pl.col("own").fill_null(0))
        .filter(pl.col("n") > 0)
        .sort(["traj_id", "utc_time", "n", "loc_id"], descending=[False, False, True, False])
        .group_by("traj_id", "utc_time", maintain_order=True)
        .head(k)
        .join(codes.select("loc_id", "code"), on="loc_id", how="inner", maintain_order="left")
        .with_columns(item=(pl.format("×{} {}", "n", "code") if count_first else pl.format("{} ×{}", "code", "n"))
                      if counts else pl.col("code"))
        .group_by("traj_id", "utc_time", maintain_order=True)
        .agg(hint=pl.format("(usually {})", pl.col("item").str.join(" ")))
    )
    return query.select("traj_id", "utc_time").join(ranked, on=["traj_id", "utc_time"], how="left", maintain_order="left").with_columns(
        pl.col("hint").fill_null("")
    )


__all__ = ["visit_hints"]
