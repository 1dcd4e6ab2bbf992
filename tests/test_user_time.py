"""The count baselines a model must beat: ``user_time`` (hour of day, user, trajectory), tuned on the
valid split only, and the two-sided Markov rule for recovery."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from lightning_modules.baselines import CountBaselines
from lightning_modules.user_time import GRID, UserTimeBaseline, UserTimeParams, tune_user_time


def _train() -> pl.DataFrame:
    """User u goes to place 1 (the office) at 9:00 on 10 days and to place 2 (home) at 20:00 on 14."""
    rows = []
    day = datetime(2024, 1, 1)
    for d in range(10):
        rows.append(("u", f"t{d}", day + timedelta(days=d, hours=9), 1))
    for d in range(14):
        rows.append(("u", f"t{d}", day + timedelta(days=d, hours=20), 2))
    rows.append(("v", "tv", day + timedelta(hours=12), 3))
    return pl.DataFrame(rows, schema=["user_id", "traj_id", "local_time", "loc_id"], orient="row").with_columns(
        utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64))


def _cases(hours: list[int], contexts: list[list[int]], targets: list[int]) -> pl.DataFrame:
    n = len(hours)
    return pl.DataFrame({"user_id": ["u"] * n, "target_hour": hours, "context": contexts, "target_loc": targets},
                        schema={"user_id": pl.String, "target_hour": pl.Int32, "context": pl.List(pl.Int64), "target_loc": pl.Int64})


def test_the_hour_of_day_decides_between_a_users_places() -> None:
    model = UserTimeBaseline(_train(), size=3)
    ranked = model.rank(_cases([9, 20, 10, 3], [[], [], [], []], [1, 2, 1, 2]), UserTimeParams(hours=1, w_user=0.1, w_traj=0.0))
    # 9:00 and 10:00 (within ±1 h) -> the office; 20:00 -> home; 3:00 (no visit near) -> overall frequency (home).
    assert ranked[:, 0].tolist() == [1, 2, 1, 2]
    assert ranked[0].tolist() == [1, 2, 3], "then the user's other place, then popularity fills the list"


def test_the_current_trajectory_counts_recent_visits_more() -> None:
    model = UserTimeBaseline(_train(), size=3)
    cases = _cases([3], [[7, 8]], [8])
    assert model.rank(cases, UserTimeParams(hours=1, w_user=0.1, w_traj=0.0))[0, 0] == 2
    # Weighted by recency: the last visit (8) counts 1, the one before (7) counts decay.
    assert model.rank(cases, UserTimeParams(hours=1, w_user=0.1, w_traj=10.0, decay=0.5))[0, :2].tolist() == [8, 7]


def test_scores_are_what_the_ranking_sorts() -> None:
    """9:00 at ±1 h: the office has 10 visits in the window plus 0.1 x 10 overall; home 0 plus 0.1 x 14."""
    model = UserTimeBaseline(_train(), size=3)
    cases = _cases([9], [[]], [1])
    cand, score = model.scores(cases, UserTimeParams(hours=1, w_user=0.1, w_traj=0.0))
    got = {int(c): float(s) for c, s in zip(cand[0], score[0]) if c >= 0}
    assert got == {1: pytest.approx(11.0, abs=1e-5), 2: pytest.approx(1.4, abs=1e-5)}
    assert model.rank(cases, UserTimeParams(hours=1, w_user=0.1, w_traj=0.0))[0, :2].tolist() == [1, 2]


def test_tuning_uses_the_cases_it_is_given_and_picks_the_hour_window() -> None:
    model = UserTimeBaseline(_train(), size=3)
    # Valid cases where only the hour term finds the target (the user's overall favourite is home).
    valid = _cases([9, 10, 8, 9], [[2], [2], [2], [2]], [1, 1, 1, 1])
    params, fig = tune_user_time(model, valid)
    assert fig["acc@1"] == 1.0 and fig["cases"] == 4 and fig["grid_points"] == int(np.prod([len(v) for v in GRID.values()]))
    assert params.hours in GRID["hours"] and params.w_traj < 4.0


def test_markov_recovery_uses_both_neighbours() -> None:
    rows, t0 = [], datetime(2024, 1, 1)
    # From 10 one usually goes to 11, but 12 is the place between 10 and 20.
    for k, seq in enumerate([[10, 11]] * 5 + [[10, 12, 20]] * 3 + [[11, 30]] * 4):
        rows += [("u", f"t{k}", t0 + timedelta(days=k, hours=i), loc) for i, loc in enumerate(seq)]
    train = pl.DataFrame(rows, schema=["user_id", "traj_id", "local_time", "loc_id"], orient="row").with_columns(
        utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64))
    base = CountBaselines(train, size=3)
    cases = pl.DataFrame({"user_id": ["u", "u"], "prev_loc": [10, 10], "next_loc": [20, None]},
                         schema={"user_id": pl.String, "prev_loc": pl.Int64, "next_loc": pl.Int64})
    ranked = base.rank("markov", cases)
    assert ranked[0, 0] == 12, "two-sided: P(c | 10) * P(20 | c)"
    assert ranked[1, 0] == 11, "one-sided when nothing is visible after the mask"


def test_the_fusion_benchmark_keeps_either_list_at_its_extreme_weight() -> None:
    """benchmarks/llm_vs_user_time.py: all the weight on one list gives that list's order; with equal weights a
    place second in both lists beats places first in only one."""
    from benchmarks.llm_vs_user_time import calibration, first_guess_source, fuse, hint_counts, hint_places, prompt_places

    llm_locs, llm_scores = np.array([[5, 6, 7, -1]]), np.array([[-1.0, -2.0, -3.0, -np.inf]])
    cand, score = np.array([[7, 6, 9, -1]]), np.array([[3.0, 2.0, 1.0, -np.inf]])
    assert fuse(llm_locs, llm_scores, cand, score, ("rrf", 1.0, 0), size=3)[0].tolist() == [5, 6, 7]
    assert fuse(llm_locs, llm_scores, cand, score, ("rrf", 0.0, 0), size=3)[0].tolist() == [7, 6, 9]
    # second in both lists beats first in only one (at k = 60, the usual reciprocal-rank constant)
    assert fuse(llm_locs, llm_scores, np.array([[9, 6, 8]]), np.array([[3.0, 2.0, 1.0]]), ("rrf", 0.5, 60), size=4)[0, 0] == 6
    # log-linear: outside the beam a place scores below the beam's last; λ = 0 is the LLM's order
    assert fuse(llm_locs, llm_scores, cand, score, ("loglin", 0.0, 1.0), size=4)[0].tolist() == [5, 6, 7, 9]
    assert hint_places(["Mon 9:00 (usually <a_1> ×3 <a_2> ×1) ", "no hint "], {"<a_1>": 11, "<a_2>": 12}) == [[11, 12], []]
    assert hint_counts(["Mon 9:00 (usually <a_1> ×3 <a_2> ×1) ", "(usually <a_1>) "]) == [[3, 1], []]
    # where a first guess comes from: the target's hint, a visit, another visit's hint only, or outside the prompt
    codes = {"<a_1><b_1>": 11, "<a_2><b_1>": 12, "<a_3><b_0>": 13, "<a_4><b_4>": 14}
    prefix = "Mon 8:00 (usually <a_3><b_0> ×2) <a_1><b_1>. Mon 9:00 (usually <a_2><b_1> ×3) "
    [(visits, named)] = prompt_places([prefix], [[11]], codes)
    assert visits == {11} and named == {11, 12, 13}
    hint = hint_places([prefix], codes)[0]
    assert [first_guess_source(g, hint, visits, named) for g in (12, 11, 13, 14)] == [0, -1, -2, -3]
    # calibration of "place 6" in two cases: the target once; probabilities 0.5 (in the beam) and 0 (outside it)
    locs, scores = np.array([[6, 5], [5, 7]]), np.log(np.array([[0.5, 0.2], [0.6, 0.1]]))
    assert calibration(locs, scores, np.array([6, 5]), np.array([6, 6])) == pytest.approx([0.5, 0.25, 0.5])


def test_count_rules_analysis_scores_each_rule_on_the_run_cases(tmp_path) -> None:
    """benchmarks/count_rules.py: the hour window picks the place of that hour, the day type splits a place
    kept for weekends from one kept for weekdays, and the user's moves from the last visit can outvote both;
    a run's test cases and a split's visits are the same cases here."""
    from benchmarks.count_rules import acc_ndcg, cases_of, ranking

    monday = datetime(2024, 1, 1)  # a Monday
    rows = []
    for w in range(4):  # 4 weeks of train trajectories: weekdays office 1 at 9:00 then cafe 3 at 10:00,
        for d in range(7):  # weekends park 2 at 9:00
            day = monday + timedelta(weeks=w, days=d)
            if d < 5:
                rows += [(f"w{w}d{d}", day + timedelta(hours=9), 1, "train"), (f"w{w}d{d}", day + timedelta(hours=10), 3, "train")]
            else:
                rows.append((f"w{w}d{d}", day + timedelta(hours=9, minutes=d), 2, "train"))
    test_day = monday + timedelta(weeks=5)
    rows += [("tA", test_day + timedelta(days=5, hours=8), 3, "test"), ("tA", test_day + timedelta(days=5, hours=9), 2, "test"),
             ("tB", test_day + timedelta(hours=8), 1, "test"), ("tB", test_day + timedelta(hours=9), 3, "test")]
    visits = pl.DataFrame(rows, schema=["traj_id", "local_time", "loc_id", "split"], orient="row").with_columns(
        user_id=pl.lit("u"), utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64))
    visits.write_parquet(tmp_path / "checkins.parquet")
    pl.DataFrame({"traj_id": ["tA", "tB"], "target_pos": [1, 1], "target_loc": [2, 3], "user_time": [[1], [1]]}).write_parquet(
        tmp_path / "rankings.parquet")
    cases, visits = cases_of(tmp_path, tmp_path)
    assert cases.sort("traj_id")["last"].to_list() == [3, 1] and visits.filter(pl.col("split") == "train").height == 48
    split_cases, _ = cases_of(tmp_path, split="test")
    assert split_cases.sort("traj_id").select("traj_id", "target_pos", "target_loc").equals(
        cases.sort("traj_id").select("traj_id", "target_pos", "target_loc"))
    # Saturday 9:00 (target: the park): at 9:00 the window counts the office 20 times, the park 8 -> wrong;
    # with the day type 8 x 3 = 24 weekend visits outvote the 20 weekday ones -> right.
    # Monday 9:00 after the office (target: the cafe): both say office (20, or 60); the office -> cafe move
    # (20 times, weight 2) outvotes it -> right.
    # NDCG@5: the park second on Saturday (1 / log2 3), the cafe (10:00) not ranked at 9:00 on Monday.
    assert acc_ndcg(ranking(cases, visits, hours=0)) == pytest.approx((0.0, 0.5 / math.log2(3)))
    assert acc_ndcg(ranking(cases, visits, hours=0, day_weight=3.0))[0] == 0.5
    assert acc_ndcg(ranking(cases, visits, hours=0, moves=2.0))[0] == 0.5
    # With the user's overall visits the cafe is ranked on Monday too (third: 0.1 x 20 after 20 and 8).
    assert ranking(cases, visits, hours=0, user_weight=0.1).sort("traj_id")["ranked"].to_list()[1] == [1, 2, 3]


def test_headroom_probe_counts_by_day_type_and_fits_a_ranker_on_valid(tmp_path) -> None:
    """benchmarks/headroom.py: window counts split by day type and hour distance (across midnight), context recency
    and moves are counted from train visits only (a leaked valid/test visit would add to the exact counts), cases
    with more candidates are padded, and a conditional logit fitted on valid cases ranks the test targets first."""
    import torch

    from benchmarks.headroom import Scorer, cases_from, coarsen, features, fit, rank, tensors, visits_of
    from lightning_modules.metrics import per_case

    monday, rows = datetime(2024, 1, 1), []
    for w in range(4):  # train: weekdays office 1 at 9:00, cafe 3 at 10:00, bar 4 at 23:30; weekends park 2 at 9:00
        for d in range(7):
            day = monday + timedelta(weeks=w, days=d)
            if d < 5:
                rows += [(f"w{w}d{d}", day + timedelta(hours=h), loc, "train") for h, loc in ((9, 1), (10, 3), (23.5, 4))]
            else:
                rows.append((f"w{w}d{d}", day + timedelta(hours=9, minutes=d), 2, "train"))
    for w, split in ((4, "valid"), (5, "test")):  # a Saturday cafe -> park; a Monday office -> cafe; a Tuesday night
        day = monday + timedelta(weeks=w)       # at a place never seen in train (9), then 1 h after the bar's hour
        rows += [(f"{split}A", day + timedelta(days=5, hours=8), 3, split), (f"{split}A", day + timedelta(days=5, hours=9), 2, split),
                 (f"{split}B", day + timedelta(hours=9), 1, split), (f"{split}B", day + timedelta(hours=10), 3, split),
                 (f"{split}C", day + timedelta(days=1, minutes=10), 9, split), (f"{split}C", day + timedelta(days=1, minutes=40), 4, split)]
    pl.DataFrame(rows, schema=["traj_id", "local_time", "loc_id", "split"], orient="row").with_columns(
        user_id=pl.lit("u"), utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64),
    ).write_parquet(tmp_path / "checkins.parquet")
    visits = visits_of(tmp_path)
    keys = lambda split: visits.filter((pl.col("split") == split) & (pl.col("pos") >= 1)).select("traj_id", target_pos="pos")  # noqa: E731
    valid, test = cases_from(visits, keys("valid")), cases_from(visits, keys("test"))
    assert test.select("last", "hour", "weekend").rows() == [(3, 9, True), (1, 10, False), (9, 0, False)]
    table, names = features(test, visits)
    f = {(c, loc): r for c, loc, r in zip(table["case"], table["loc_id"], table.select(names).rows(named=True))}
    sat_park, sat_office, sat_cafe, mon_cafe, night_bar = f[0, 2], f[0, 1], f[0, 3], f[1, 3], f[2, 4]
    assert (sat_park["w0_same"], sat_park["w0_other"], sat_office["w0_same"], sat_office["w0_other"]) == (8, 0, 0, 20)
    assert sat_cafe["w1_other"] == 20 and sat_cafe["recent1"] == 1 and sat_park["recent1"] == 0
    assert mon_cafe["w0_same"] == 20 and mon_cafe["user_moves"] == 20 and mon_cafe["all_moves"] == 20 and sat_park["user"] == 8
    assert night_bar["w1_same"] == 20 and night_bar["w0_same"] == 0, "23:30 is one hour from 00:40"
    assert f[2, 9]["recent1"] == 1 and f[2, 9]["user"] == 0, "a context place never visited in train is a candidate"
    assert table.group_by("case").len().sort("case")["len"].to_list() == [4, 4, 5]
    merged, merged_names = coarsen(table, names, "day")
    assert merged.filter((pl.col("case") == 0) & (pl.col("loc_id") == 1))["w0"].item() == 20 and "w0_same" not in merged_names
    xv, mv, tv, _ = tensors(*features(valid, visits), valid.height)
    xt, mt, _, lt = tensors(table, names, test.height)
    assert mt.sum(1).tolist() == [4, 4, 5] and (lt[:2, 4] == -1).all()
    hits = per_case(rank(fit(xv, mv, tv, hidden=0), xt, mt, lt), test["target_loc"].to_numpy())
    assert hits["acc@1"].tolist() == [1.0, 1.0, 1.0] and hits["ndcg@5"].tolist() == [1.0, 1.0, 1.0]
    flat = Scorer(xt.shape[-1])
    torch.nn.init.zeros_(flat.net.weight), torch.nn.init.zeros_(flat.net.bias)
    assert rank(flat, xt, mt, lt)[2].tolist() == [1, 2, 3, 4, 9] + [-1] * 5, "equal scores: the smaller location id first"
    # The run's own hint rule, from its config.yaml, in the test cases' order (the order of rankings.parquet may differ).
    from benchmarks.headroom import run_hint_rule

    run = tmp_path / "run"
    run.mkdir()
    pl.DataFrame({"traj_id": ["testC", "testA", "testB"], "target_pos": [1, 1, 1], "target_loc": [4, 2, 3],
                  "user_time": [[4], [2], [1]]}).write_parquet(run / "rankings.parquet")
    samples = "data:\n  samples:\n    visit_hints: {}\n    visit_hint_hours: 1\n    visit_hint_user_weight: 0.0\n    visit_hint_day_weight: 3.0\n"
    (run / "config.yaml").write_text(samples.format(3))
    label, hints = run_hint_rule(tmp_path, run, test)
    assert label == "the run's hint rule (±1 h, day type 3×, + 0 × user)"
    # Saturday 09:00: the park (8 weekend visits × 3) before the office (20 weekday visits); Monday 10:00: the office
    # at 9 and the cafe at 10 tie at 20 × 3 (the smaller id first), then the weekend park at 9 (8 × 1); Tuesday 00:40:
    # the bar at 23:30, one hour away.
    assert [row[row >= 0].tolist() for row in hints] == [[2, 1, 3], [1, 3, 2], [4]]
    (run / "config.yaml").write_text(samples.format(0))
    assert run_hint_rule(tmp_path, run, test) is None, "a run without visit hints has no hint rule"
