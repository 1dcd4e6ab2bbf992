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

With ``data.samples.visit_hint_day_weight=w`` a window visit on the hinted visit's day type (weekday or
weekend) counts ``w`` times, and with ``visit_hint_user_weight=u`` each of the user's places also scores
``u`` times its train visits at any hour: a Saturday's hint favours Saturday habits, and a time of day
the user has no habit at still gets their usual places, ranked after any window habit when ``u`` is small.
With counts, ``×n`` is then the rounded score (``×0``: a place the user seldom visits near that hour).

With ``data.samples.visit_hint_moves_weight=m`` each place also scores ``m`` times the user's train moves
from the visit's previous place in its trajectory to it (a move: two consecutive visits of one train
trajectory): what usually follows where the user just was, the order a sequence model such as the
``gru`` baseline reads. The previous visit is written before the hint in every next-location sample, so
the hint names nothing the prompt does not already show; a recovery sample masks visits whose
successor's hint would then tell them, which is why ``pipeline/config.py`` refuses the weight beside a
recovery task. The first visit of a trajectory has no previous place and no moves term.

Only ``split == "train"`` visits count, and a train visit's hint leaves out its own trajectory
(leave-one-trajectory-out): a hint never counts the visit it stands beside, so it is no more
accurate at training than at test, where the visits are never train visits. The rule is that of
the ``user_time`` baseline's main term (``lightning_modules/user_time.py``), written where the
model can use it together with the trajectory. A departure from the paper (off in its configs).
"""

from __future__ import annotations

import polars as pl

from datamodules.samples import add_positions

KEY = ["traj_id", "utc_time"]  # a visit


def hint_scores(history: pl.DataFrame, hours: int = 1, visits: pl.DataFrame | None = None,
                user_weight: float = 0.0, day_weight: float = 1.0, moves_weight: float = 0.0) -> pl.DataFrame:
    """``traj_id, utc_time, loc_id, score``: every place with a positive score for every visit.

    A place's score for a visit is ``window + user_weight * all + moves_weight * moves``: ``window``
    counts the user's train visits to it within ``hours`` of the visit's time of day, those on the
    visit's day type (weekday or weekend) ``day_weight`` times, ``all`` counts them at any hour, and
    ``moves`` counts the user's train moves to it from the place of the visit before it in its
    trajectory (in ``visits`` when they carry ``loc_id``, else in ``history``). The visit's own trajectory
    is left out of all three. At the defaults the score is the plain window count.

    Args:
        history: Check-ins with ``traj_id, user_id, loc_id, local_time, split`` (only ``train`` rows count).
        hours: Half-width of the time-of-day window, in hours (circular: 23:00 is next to 00:00).
        visits: The visits to score (``traj_id, user_id, utc_time, local_time``); default: ``history``'s.
        user_weight: Weight of the user's visits to a place at any hour (0: the window only). Above 0,
            every place of the user is scored.
        day_weight: Weight of a window visit on the scored visit's day type (1: day type ignored).
        moves_weight: Weight of the user's train moves from the visit's previous place (0: none).
    """
    hour = pl.col("local_time").dt.hour().cast(pl.Int16)
    weekend = pl.col("local_time").dt.weekday() >= 6
    train = history.filter(pl.col("split") == "train").select("user_id", "traj_id", "loc_id", hour=hour, weekend=weekend)

    def around(keys: list[str]) -> pl.DataFrame:
        """Train visits per ``keys``, day type and place, for every query hour whose window holds them."""
        counted = train.group_by(*keys, "hour", "weekend", "loc_id").agg(n=pl.len())
        shifted = [counted.with_columns(at=((pl.col("hour") + d) % 24).cast(pl.Int16)) for d in range(-hours, hours + 1)]
        return pl.concat(shifted).group_by(*keys, "at", "weekend", "loc_id").agg(pl.col("n").sum())

    query = (history if visits is None else visits).select(
        "traj_id", "user_id", "utc_time", at=hour, day=weekend).unique(KEY, maintain_order=True)
    # Window visits of the user less those of the visit's own trajectory, per day type, then weighted.
    scores = (
        query.join(around(["user_id"]), on=["user_id", "at"], how="inner")
        .join(around(["traj_id"]).rename({"n": "own"}), on=["traj_id", "at", "weekend", "loc_id"], how="left")
        .group_by(*KEY, "loc_id")
        .agg(score=((pl.col("n") - pl.col("own").fill_null(0))
                    * pl.when(pl.col("weekend") == pl.col("day")).then(day_weight).otherwise(1.0)).sum())
    )
    if user_weight:
        overall = (
            query.join(train.group_by("user_id", "loc_id").agg(n=pl.len()), on="user_id", how="inner")
            .join(train.group_by("traj_id", "loc_id").agg(own=pl.len()), on=["traj_id", "loc_id"], how="left")
            .select(*KEY, "loc_id", score=user_weight * (pl.col("n") - pl.col("own").fill_null(0)))
        )
        scores = pl.concat([scores, overall], how="vertical_relaxed").group_by(*KEY, "loc_id").agg(pl.col("score").sum())
    if moves_weight:
        written = visits if visits is not None and "loc_id" in visits.columns else None
        scores = pl.concat([scores, _move_scores(history, written, query, moves_weight)], how="vertical_relaxed").group_by(
            *KEY, "loc_id").agg(pl.col("score").sum())
    return scores.filter(pl.col("score") > 0)


def _previous(visits: pl.DataFrame) -> pl.DataFrame:
    """``visits`` (one row per visit) with ``prev``, the place of the visit before it in its trajectory, in
    the order the prompts write them (:func:`datamodules.samples.add_positions`)."""
    return (add_positions(visits).unique(KEY, keep="first", maintain_order=True)
            .with_columns(prev=pl.col("loc_id").shift(1).over("traj_id")))


def _move_scores(history: pl.DataFrame, written: pl.DataFrame | None, query: pl.DataFrame, weight: float) -> pl.DataFrame:
    """``traj_id, utc_time, loc_id, score``: ``weight`` x the user's train moves (in ``history``) from each
    ``query`` visit's previous place to ``loc_id``, those of its own trajectory left out. The previous place
    is taken from ``written``, the visits the query's prompts are written from (a predicted user's own
    check-ins), or from ``history`` when None."""
    ordered = _previous(history.select("traj_id", "user_id", "utc_time", "loc_id", "split"))
    moves = ordered.filter((pl.col("split") == "train") & pl.col("prev").is_not_null())
    before = ordered if written is None else _previous(written.select(*KEY, "loc_id"))
    return (
        query.select(KEY + ["user_id"]).join(before.select(*KEY, "prev"), on=KEY, how="inner")
        .filter(pl.col("prev").is_not_null())
        .join(moves.group_by("user_id", "prev", "loc_id").agg(n=pl.len()), on=["user_id", "prev"], how="inner")
        .join(moves.group_by("traj_id", "prev", "loc_id").agg(own=pl.len()), on=["traj_id", "prev", "loc_id"], how="left")
        .select(*KEY, "loc_id", score=weight * (pl.col("n") - pl.col("own").fill_null(0)))
    )


def top_places(scores: pl.DataFrame, k: int) -> pl.DataFrame:
    """``traj_id, utc_time, loc_id, score``: each visit's ``k`` highest-scoring places, best first.

    The order of the hints, of ``benchmarks/count_rules.py``'s rules and of ``benchmarks/base_prior.py``:
    visits in ``traj_id, utc_time`` order; within a visit, score descending, ties to the smaller ``loc_id``.

    Args:
        scores: ``traj_id, utc_time, loc_id, score`` rows, e.g. :func:`hint_scores`.
        k: Places kept per visit.
    """
    return (scores.sort([*KEY, "score", "loc_id"], descending=[False, False, True, False])
            .group_by(KEY, maintain_order=True).head(k))


def visit_hints(history: pl.DataFrame, codes: pl.DataFrame, k: int, hours: int = 1,
                visits: pl.DataFrame | None = None, counts: bool = False, count_first: bool = False,
                user_weight: float = 0.0, day_weight: float = 1.0, moves_weight: float = 0.0) -> pl.DataFrame:
    """``traj_id, utc_time, hint, hint_places``: the hint text of every visit (``""`` where no place scores;
    an empty frame for ``k <= 0``) and how many places it names (each is a run of code tokens of its own,
    which whole-trajectory samples must not label as the visit's code).

    Args:
        history: Check-ins with ``traj_id, user_id, loc_id, local_time, split`` (only ``train`` rows count).
        codes: ``loc_id, code`` token strings.
        k: Places per hint, highest :func:`hint_scores` first (ties: the smaller ``loc_id``).
        hours, visits, user_weight, day_weight, moves_weight: As in :func:`hint_scores`.
        counts: Follow each place with `` ×n``, its score rounded (at the default weights: its train visits
            in the window, its own trajectory's left out).
        count_first: With ``counts``, write ``×n <code>`` (the count before its place) instead.
    """
    if k <= 0:
        return pl.DataFrame(schema={"traj_id": pl.String, "utc_time": pl.Datetime("us", "UTC"), "hint": pl.String,
                                    "hint_places": pl.Int32})
    n = pl.col("score").round(0).cast(pl.Int64)
    ranked = (
        top_places(hint_scores(history, hours, visits, user_weight, day_weight, moves_weight), k)
        .join(codes.select("loc_id", "code"), on="loc_id", how="inner", maintain_order="left")
        .with_columns(item=(pl.format("×{} {}", n, "code") if count_first else pl.format("{} ×{}", "code", n))
                      if counts else pl.col("code"))
        .group_by(*KEY, maintain_order=True)
        .agg(hint=pl.format("(usually {})", pl.col("item").str.join(" ")), hint_places=pl.len().cast(pl.Int32))
    )
    query = (history if visits is None else visits).select(KEY).unique(KEY, maintain_order=True)
    return query.join(ranked, on=KEY, how="left", maintain_order="left").with_columns(
        pl.col("hint").fill_null(""), pl.col("hint_places").fill_null(0))


__all__ = ["hint_scores", "top_places", "visit_hints"]
