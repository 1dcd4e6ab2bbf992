"""Visit hints (data.samples.visit_hints): the user's usual places at a visit's time of day, from train
visits only, never counting the visit's own trajectory."""

from __future__ import annotations

from datetime import datetime, timezone

import polars as pl

from datamodules.visit_hints import top_places, visit_hints


def _visits(rows: list[tuple[str, str, int, str, str]]) -> pl.DataFrame:
    """(traj_id, user_id, loc_id, "HH:MM" on a day index "d", split) -> check-ins."""
    out = []
    for i, (traj, user, loc, when, split) in enumerate(rows):
        day, clock = when.split(" ")
        hh, mm = (int(x) for x in clock.split(":"))
        t = datetime(2012, 4, int(day), hh, mm, i % 60, tzinfo=timezone.utc)
        out.append({"traj_id": traj, "user_id": user, "loc_id": loc, "utc_time": t, "local_time": t.replace(tzinfo=None), "split": split})
    return pl.DataFrame(out)


CODES = pl.DataFrame({"loc_id": [1, 2, 3, 4, 5], "code": ["<A>", "<B>", "<C>", "<D>", "<E>"]})


def _hint(hints: pl.DataFrame, traj: str, visits: pl.DataFrame, pos: int = 0) -> str:
    t = visits.filter(pl.col("traj_id") == traj).sort("utc_time")["utc_time"][pos]
    return hints.filter((pl.col("traj_id") == traj) & (pl.col("utc_time") == t))["hint"].item()


def _next_index(targets: list[tuple[int, int]]) -> pl.DataFrame:
    """Next-location index rows of the test trajectory "x1" of user "u": (target loc_id, target position),
    each predicted from the visits before it; the last row is the trajectory's last visit."""
    n, positions = len(targets), [pos for _, pos in targets]
    return pl.DataFrame({"task": ["next"] * n, "split": ["test"] * n, "traj_id": ["x1"] * n, "user_id": ["u"] * n,
                         "loc_id": [loc for loc, _ in targets], "is_last": [i == n - 1 for i in range(n)], "template": [0] * n,
                         "start": [0] * n, "end": positions, "target_pos": positions,
                         "masked": [None] * n},
                        schema_overrides={"start": pl.Int32, "end": pl.Int32, "target_pos": pl.Int32, "template": pl.Int32,
                                          "masked": pl.List(pl.Int32), "loc_id": pl.Int64})


def test_top_places_ranks_each_visit_by_score_then_smaller_place() -> None:
    """The one order of the hints and of the count-rule benchmarks: per visit (in traj_id, utc_time
    order), score descending, ties to the smaller loc_id, at most k places."""
    t1, t2 = (datetime(2012, 4, 1, h, tzinfo=timezone.utc) for h in (8, 9))
    scores = pl.DataFrame({"traj_id": ["b", "a", "a", "a", "a", "a"], "utc_time": [t1, t2, t1, t1, t1, t1],
                           "loc_id": [5, 4, 3, 1, 2, 4], "score": [1.0, 2.0, 0.5, 3.0, 3.0, 7.0]})
    top = top_places(scores, 3)
    assert top.columns == ["traj_id", "utc_time", "loc_id", "score"]
    assert top.select("traj_id", "utc_time", "loc_id").rows() == [
        ("a", t1, 4), ("a", t1, 1), ("a", t1, 2),  # 7, then the 3-3 tie to the smaller place; 0.5 cut by k
        ("a", t2, 4), ("b", t1, 5)]
    assert top_places(scores, 1)["loc_id"].to_list() == [4, 4, 5]


def test_hints_count_train_visits_of_other_trajectories_only() -> None:
    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 1, "2 09:30", "train"),
        ("t2", "u", 2, "3 09:10", "train"), ("t2", "u", 4, "3 18:00", "train"),
        ("v1", "u", 3, "4 09:00", "valid"), ("v1", "u", 3, "4 09:20", "valid"), ("v1", "u", 3, "4 09:40", "valid"),
        ("x1", "u", 5, "5 09:15", "test"),
        ("t3", "w", 5, "2 09:00", "train"),  # another user's habits never count
    ])
    hints = visit_hints(v, CODES, k=3, hours=1)
    # A test visit: every train visit of the user around 09:00, most visited first; no valid visit, no other user.
    assert _hint(hints, "x1", v) == "(usually <A> <B>)"
    # A train visit of t1: its own trajectory left out, so the hint is no better at training than at test.
    assert _hint(hints, "t1", v) == "(usually <B>)"
    assert _hint(hints, "t2", v) == "(usually <A>)"
    # 18:00 has only t2's own visit: nothing left to hint.
    assert _hint(hints, "t2", v, pos=1) == ""
    assert visit_hints(v, CODES, k=0).is_empty()


def test_the_hour_window_wraps_around_midnight_and_k_caps_the_list() -> None:
    v = _visits([
        ("t1", "u", 1, "2 00:10", "train"), ("t2", "u", 2, "3 22:50", "train"), ("t2", "u", 2, "3 23:05", "train"),
        ("t3", "u", 3, "4 12:00", "train"),
        ("x1", "u", 4, "5 23:40", "test"), ("x2", "u", 4, "6 10:00", "test"),
    ])
    hints = visit_hints(v, CODES, k=1, hours=1)
    assert _hint(hints, "x1", v) == "(usually <B>)"  # 22:xx, 23:xx and 00:xx are within an hour of 23:40; k=1 keeps the most visited
    assert _hint(hints, "x2", v) == ""               # 12:00 is two hours away
    assert _hint(visit_hints(v, CODES, k=3, hours=2), "x2", v) == "(usually <C>)"


def test_rendered_visits_carry_their_hint_and_the_target_prefix_ends_with_it() -> None:
    from datamodules.config import SampleConfig
    from datamodules.rendering import render_samples

    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 2, "2 12:00", "train"), ("t1", "u", 1, "2 18:00", "train"),
        ("x1", "u", 2, "5 09:05", "test"), ("x1", "u", 3, "5 12:10", "test"), ("x1", "u", 1, "5 18:20", "test"),
    ])
    index = _next_index([(1, 2)])
    cfg = SampleConfig(visit_text="compact", next_format="continuation", visit_hints=2)
    row = render_samples(index, v, CODES, cfg=cfg).row(0, named=True)
    assert row["response_prefix"].startswith("Thu 09:05 (usually <A>) <B>. Thu 12:10 (usually <B>) <C>.")
    assert row["response_prefix"].endswith("Thu 18:20 (usually <A>) ") and row["target"] == "<A>"
    plain = render_samples(index, v, CODES, cfg=SampleConfig(visit_text="compact", next_format="continuation"))
    assert "usually" not in plain["response_prefix"].item()


def test_hints_for_visits_outside_the_history() -> None:
    """stage=predict: the user's recent check-ins (no split, a trajectory of their own) get hints from the
    train history."""
    history = _visits([("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 2, "2 18:00", "train"), ("x1", "u", 3, "5 09:00", "test")])
    recent = _visits([("predict", "u", 5, "7 08:40", "train"), ("predict", "u", 5, "7 17:30", "train")]).drop("split")
    hints = visit_hints(history, CODES, k=2, hours=1, visits=recent)
    assert hints.sort("utc_time")["hint"].to_list() == ["(usually <A>)", "(usually <B>)"]


def test_the_sample_renderer_counts_hints_once_for_every_rerendering(monkeypatch) -> None:
    """fit_history re-renders over-long samples round after round; the hints (and user memory) are counted
    once per renderer, and the text is that of render_samples computing them itself."""
    import datamodules.rendering as rendering
    from datamodules.config import SampleConfig

    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 2, "2 12:00", "train"), ("t1", "u", 1, "2 18:00", "train"),
        ("x1", "u", 2, "5 09:05", "test"), ("x1", "u", 3, "5 12:10", "test"), ("x1", "u", 1, "5 18:20", "test"),
    ])
    index = _next_index([(3, 1), (1, 2)])
    cfg = SampleConfig(visit_text="compact", next_format="continuation", visit_hints=2, user_places=2)
    expected = rendering.render_samples(index, v, CODES, cfg=cfg, memory=rendering.user_memory(v, CODES, 2))
    calls = []
    counted = rendering.visit_hints
    monkeypatch.setattr(rendering, "visit_hints", lambda *a, **k: calls.append(1) or counted(*a, **k))
    render = rendering.sample_renderer(v, CODES, None, None, cfg)
    for _ in range(3):  # three rounds of fitting
        assert render(index).equals(expected)
    assert len(calls) == 1
    assert "usually" in expected["response_prefix"][1] and "often visits" in expected["prompt"][1]


def test_hint_counts_are_the_train_visits_of_other_trajectories_in_the_window() -> None:
    """data.samples.visit_hint_counts: each place with its count, counted as the hint ranks it (train only,
    the visit's own trajectory left out), so a count is no larger at training than at test."""
    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 1, "2 09:30", "train"), ("t1", "u", 2, "2 10:05", "train"),
        ("t2", "u", 2, "3 09:10", "train"), ("t2", "u", 1, "3 08:20", "train"),
        ("v1", "u", 3, "4 09:00", "valid"), ("v1", "u", 3, "4 09:20", "valid"),  # valid visits never count
        ("x1", "u", 5, "5 09:15", "test"),
    ])
    hints = visit_hints(v, CODES, k=3, hours=1, counts=True)
    assert _hint(hints, "x1", v) == "(usually <A> ×3 <B> ×2)"
    assert _hint(hints, "t1", v) == "(usually <A> ×1 <B> ×1)"     # t1's own three visits left out
    assert _hint(hints, "t2", v, pos=0) == "(usually <A> ×2)"  # 08:20: t1's two visits to <A>; its 10:05 is outside
    # Without counts the hint lists the same places in the same order.
    plain = visit_hints(v, CODES, k=3, hours=1)
    assert _hint(plain, "x1", v) == "(usually <A> <B>)"


def test_rendered_hint_counts_and_the_switch_off_leaves_fingerprints_alone() -> None:
    from datamodules.config import SampleConfig
    from datamodules.rendering import render_samples
    from pipeline.paths import align_fingerprint
    from tests.conftest import compose_run

    v = _visits([("t1", "u", 1, "2 09:00", "train"), ("t2", "u", 1, "3 09:30", "train"),
                 ("x1", "u", 2, "5 07:50", "test"), ("x1", "u", 1, "5 09:20", "test")])
    cfg = SampleConfig(visit_text="compact", next_format="continuation", visit_hints=1, visit_hint_counts=True)
    row = render_samples(_next_index([(1, 1)]), v, CODES, cfg=cfg).row(0, named=True)
    assert row["response_prefix"].endswith("Thu 09:20 (usually <A> ×2) ") and row["target"] == "<A>"
    # The switch off is the rendering of the models trained before it: their fingerprints stay; on, it is new.
    base = ["experiment=smoke", "data.samples.visit_hints=1"]
    assert align_fingerprint(compose_run(base)) == align_fingerprint(compose_run(base + ["data.samples.visit_hint_counts=false"]))
    assert align_fingerprint(compose_run(base)) != align_fingerprint(compose_run(base + ["data.samples.visit_hint_counts=true"]))


def test_count_first_writes_each_count_before_its_place_and_only_moves_it() -> None:
    """data.samples.visit_hint_count_first: "(usually ×3 <A> ×2 <B>)" — the same places, order and counts as
    "(usually <A> ×3 <B> ×2)"; rendered so up to the target, off (the default) leaves fingerprints alone, and
    the benchmark reads the same places and counts from either form."""
    from benchmarks.llm_vs_user_time import hint_counts, hint_places
    from datamodules.config import SampleConfig
    from datamodules.rendering import render_samples
    from pipeline.paths import align_fingerprint
    from tests.conftest import compose_run

    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 1, "2 09:30", "train"), ("t1", "u", 2, "2 10:05", "train"),
        ("t2", "u", 2, "3 09:10", "train"), ("t2", "u", 1, "3 08:20", "train"),
        ("x1", "u", 5, "5 09:15", "test"),
    ])
    after = visit_hints(v, CODES, k=3, hours=1, counts=True)
    first = visit_hints(v, CODES, k=3, hours=1, counts=True, count_first=True)
    assert _hint(after, "x1", v) == "(usually <A> ×3 <B> ×2)"
    assert _hint(first, "x1", v) == "(usually ×3 <A> ×2 <B>)"
    # Without counts there is nothing to move.
    assert _hint(visit_hints(v, CODES, k=3, hours=1, count_first=True), "x1", v) == "(usually <A> <B>)"
    code_to_loc = {"<A>": 1, "<B>": 2}
    prefixes = ["Thu 09:15 (usually <A> ×3 <B> ×2) ", "Thu 09:15 (usually ×3 <A> ×2 <B>) "]
    assert hint_places(prefixes, code_to_loc) == [[1, 2], [1, 2]]
    assert hint_counts(prefixes) == [[3, 2], [3, 2]]

    cfg = SampleConfig(visit_text="compact", next_format="continuation", visit_hints=1, visit_hint_counts=True,
                       visit_hint_count_first=True)
    w = _visits([("t1", "u", 1, "2 09:00", "train"), ("t2", "u", 1, "3 09:30", "train"),
                 ("x1", "u", 2, "5 07:50", "test"), ("x1", "u", 1, "5 09:20", "test")])
    row = render_samples(_next_index([(1, 1)]), w, CODES, cfg=cfg).row(0, named=True)
    assert row["response_prefix"].endswith("Thu 09:20 (usually ×2 <A>) ") and row["target"] == "<A>"
    base = ["experiment=smoke", "data.samples.visit_hints=1", "data.samples.visit_hint_counts=true"]
    assert align_fingerprint(compose_run(base)) == align_fingerprint(compose_run(base + ["data.samples.visit_hint_count_first=false"]))
    assert align_fingerprint(compose_run(base)) != align_fingerprint(compose_run(base + ["data.samples.visit_hint_count_first=true"]))


def test_hint_weights_score_day_type_and_the_users_other_hours_leaving_the_own_trajectory_out() -> None:
    """data.samples.visit_hint_day_weight / visit_hint_user_weight: window visits on the hinted visit's day
    type count more, the user's visits at any hour fill the rest of the list, "×n" is the rounded score, and
    the visit's own trajectory counts in neither term. At 1 / 0 the hint is the plain window count."""
    v = _visits([
        ("t1", "u", 1, "2 09:00", "train"), ("t1", "u", 1, "2 09:30", "train"),   # Monday: a weekday
        ("t2", "u", 2, "7 09:10", "train"), ("t2", "u", 2, "7 09:40", "train"), ("t2", "u", 2, "7 09:50", "train"),  # Saturday
        ("t3", "u", 3, "9 18:00", "train"), ("t3", "u", 3, "9 19:00", "train"), ("t3", "u", 3, "9 20:00", "train"),
        ("t3", "u", 3, "9 21:00", "train"),                                         # far from 09:00
        ("x1", "u", 5, "5 09:15", "test"),                                          # Thursday
        ("x2", "u", 5, "8 09:20", "test"),                                          # Sunday
    ])
    plain = visit_hints(v, CODES, k=3, hours=1, counts=True)
    assert _hint(plain, "x1", v) == _hint(plain, "x2", v) == "(usually <B> ×3 <A> ×2)"
    assert visit_hints(v, CODES, k=3, hours=1, counts=True, user_weight=0.0, day_weight=1.0).equals(plain)
    day = visit_hints(v, CODES, k=3, hours=1, counts=True, day_weight=3.0)
    assert _hint(day, "x1", v) == "(usually <A> ×6 <B> ×3)"   # the weekday visits to <A> count 3x on a Thursday
    assert _hint(day, "x2", v) == "(usually <B> ×9 <A> ×2)"   # and the Saturday ones on a Sunday
    user = visit_hints(v, CODES, k=3, hours=1, counts=True, user_weight=0.1)
    assert _hint(user, "x1", v) == "(usually <B> ×3 <A> ×2 <C> ×0)"  # <C>: 0.4, never near 09:00
    # A train visit of t3 at 18:00: no other trajectory's visit near it; the user term fills the hint, but
    # t3's own four visits to <C> count in neither term.
    assert _hint(plain, "t3", v) == ""
    assert _hint(user, "t3", v) == "(usually <B> ×0 <A> ×0)"
    assert _hint(visit_hints(v, CODES, k=3, hours=1, user_weight=0.1), "t3", v) == "(usually <B> <A>)"


def test_hint_weights_are_checked_and_leave_fingerprints_alone_at_their_neutral_values() -> None:
    import pytest

    from datamodules.config import SampleConfig
    from datamodules.config import ConfigError
    from pipeline.paths import align_fingerprint, data_fingerprint
    from tests.conftest import compose_run

    with pytest.raises(ConfigError, match="visit_hint_user_weight"):
        SampleConfig(visit_hint_user_weight=-0.1)
    with pytest.raises(ConfigError, match="visit_hint_day_weight"):
        SampleConfig(visit_hint_day_weight=-1)
    base = ["experiment=smoke", "data.samples.visit_hints=1", "data.samples.visit_hint_counts=true"]
    neutral = ["data.samples.visit_hint_user_weight=0", "data.samples.visit_hint_day_weight=1"]
    assert align_fingerprint(compose_run(base)) == align_fingerprint(compose_run(base + neutral))
    for switch in ("data.samples.visit_hint_user_weight=0.1", "data.samples.visit_hint_day_weight=3"):
        assert align_fingerprint(compose_run(base)) != align_fingerprint(compose_run(base + [switch]))
        assert data_fingerprint(compose_run(base)) == data_fingerprint(compose_run(base + [switch]))  # one RQ-VAE


def test_predict_warns_about_a_model_aligned_on_the_hint_runs_before_the_label_fix(caplog) -> None:
    """A model whose qtmob.json records hints in whole-trajectory samples but no ``training.hint_labels``, and whose
    run fingerprint does not match, may predate the label fix (its labels were hint runs as much as visit codes):
    stage=predict says so. A recorded fix, a matching fingerprint, no hints or per-prefix questions pass silently."""
    import logging

    from datamodules.config import SampleConfig
    from pipeline.paths import render_settings
    from pipeline.predict import trained_settings
    from tests.conftest import compose_run

    samples = SampleConfig(visit_text="compact", next_format="trajectory", visit_hints=1)
    hinted = {"next_format": "trajectory", "visit_hints": 1, "visit_text": "compact", "training": {"code_softmax": "level"}}
    cases = [
        (hinted, True),
        ({**hinted, "training": {"code_softmax": "level", "hint_labels": "visit-code-runs"}}, False),
        ({**hinted, "visit_hints": 0}, False),
        ({**hinted, "next_format": "question"}, False),
    ]
    for meta, warns in cases:
        for matches in (False, True):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
                trained_settings(meta, samples, "level", fingerprint_matches=matches)
            # a model whose run fingerprint (which carries the fix's marker) matches this config was aligned after
            # the fix, though before qtmob.json recorded it: no warning
            assert ("label fix" in caplog.text) is (warns and not matches), (meta, matches, caplog.text)
    # what the alignment records is the fingerprint's marker: set exactly where hints meet trajectory samples
    hint = ["experiment=smoke", "data.samples.visit_hints=1"]
    assert render_settings(compose_run(hint + ["data.samples.next_format=trajectory"]))["hint_labels"] == "visit-code-runs"
    assert "hint_labels" not in render_settings(compose_run(hint))


def test_moves_weight_scores_what_follows_the_previous_place_leaving_the_own_trajectory_out() -> None:
    """data.samples.visit_hint_moves_weight: a place also scores m x the user's train moves to it from the
    visit's previous place in its trajectory; moves of the visit's own trajectory, of other users and of
    non-train trajectories never count, and a trajectory's first visit has no moves term."""
    v = _visits([
        ("t1", "u", 1, "2 08:00", "train"), ("t1", "u", 3, "2 12:00", "train"),    # a move 1 -> 3
        ("t2", "u", 1, "3 08:00", "train"), ("t2", "u", 3, "3 12:30", "train"),    # another move 1 -> 3
        ("t3", "u", 2, "4 12:10", "train"), ("t5", "u", 2, "5 11:50", "train"),    # <B> near noon twice, no move
        ("t4", "w", 1, "4 08:00", "train"), ("t4", "w", 4, "4 12:00", "train"),    # another user's move 1 -> 4
        ("v1", "u", 1, "6 08:00", "valid"), ("v1", "u", 5, "6 12:00", "valid"),    # a valid move 1 -> 5
        ("x1", "u", 1, "9 08:05", "test"), ("x1", "u", 2, "9 12:05", "test"),
    ]).sample(fraction=1.0, shuffle=True, seed=3)  # any stored order: moves follow time within a trajectory
    plain = visit_hints(v, CODES, k=3, hours=1, counts=True)
    assert visit_hints(v, CODES, k=3, hours=1, counts=True, moves_weight=0.0).equals(plain)
    assert _hint(plain, "x1", v, pos=1) == "(usually <B> ×2 <C> ×2)"  # the noon window: a tie, to the smaller place
    moved = visit_hints(v, CODES, k=3, hours=1, counts=True, moves_weight=2.0)
    # From <A> the user moved to <C> twice in train (x 2 = 4, plus its 2 noon visits); <D> (another user's move)
    # and <E> (a valid move) do not count.
    assert _hint(moved, "x1", v, pos=1) == "(usually <C> ×6 <B> ×2)"
    assert _hint(moved, "x1", v, pos=0) == _hint(plain, "x1", v, pos=0)  # the first visit: no previous place
    # A train visit's own trajectory is left out: t1's noon visit sees t2's move only (2) plus t2's noon visit (1).
    assert _hint(moved, "t1", v, pos=1) == "(usually <C> ×3 <B> ×2)"
    assert _hint(plain, "t1", v, pos=1) == "(usually <B> ×2 <C> ×1)"
    # stage=predict: a user's own check-ins outside the data (visits=...) take their previous place from
    # themselves, their moves from the user's train trajectories.
    own = _visits([("p", "u", 1, "9 08:05", "test"), ("p", "u", 2, "9 12:05", "test")])
    predicted = visit_hints(v, CODES, k=3, hours=1, counts=True, moves_weight=2.0, visits=own)
    assert _hint(predicted, "p", own, pos=1) == "(usually <C> ×6 <B> ×2)"
    assert _hint(predicted, "p", own, pos=0) == _hint(visit_hints(v, CODES, k=3, hours=1, counts=True, visits=own), "p", own, pos=0)


def test_moves_weight_is_refused_beside_recovery_tasks_and_neutral_at_zero() -> None:
    import pytest

    from datamodules.config import ConfigError, SampleConfig
    from pipeline.paths import align_fingerprint, data_fingerprint
    from tests.conftest import compose_run

    with pytest.raises(ConfigError, match="visit_hint_moves_weight"):
        SampleConfig(visit_hint_moves_weight=-1)
    base = ["experiment=smoke", "data.samples.visit_hints=1", "objectives=next_only", "eval.tasks=[next]"]
    with pytest.raises(ConfigError, match=r"visit_hint_moves_weight=2 with recovery tasks \['recovery_single'\]"):
        compose_run(["experiment=smoke", "data.samples.visit_hints=1", "objectives=next_only",
                     "data.samples.visit_hint_moves_weight=2"])
    with pytest.raises(ConfigError, match="recovery_multi"):
        compose_run(["experiment=smoke", "data.samples.visit_hints=1", "eval.tasks=[next]",
                     "data.samples.visit_hint_moves_weight=2"])
    compose_run(base + ["data.samples.visit_hint_moves_weight=2"])  # next-location only: allowed
    compose_run(["experiment=smoke", "data.samples.visit_hint_moves_weight=2"])  # no hints, nothing to leak: allowed
    assert align_fingerprint(compose_run(base)) == align_fingerprint(compose_run(base + ["data.samples.visit_hint_moves_weight=0"]))
    moved = compose_run(base + ["data.samples.visit_hint_moves_weight=2"])
    assert align_fingerprint(compose_run(base)) != align_fingerprint(moved)
    assert data_fingerprint(compose_run(base)) == data_fingerprint(moved)  # one RQ-VAE for a grid over it
