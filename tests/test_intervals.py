"""Paired bootstrap intervals and the "beats" marks on hand-made cases: a known difference, an exact
tie, and per-case figures that average to the RankingMetrics figures."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from lightning_modules.metrics import RankingMetrics, paired_bootstrap, per_case
from lightning_modules.results import beaten, bootstrap_by_task, first_guesses, hit_split, results_markdown, score_by_task


def test_per_case_figures_average_to_the_metric() -> None:
    rng = np.random.default_rng(0)
    ranked = np.stack([rng.permutation(30)[:10] for _ in range(200)])
    target = rng.integers(0, 30, size=200)
    m = RankingMetrics()
    m.update(torch.tensor(ranked), torch.tensor(target))
    ref = {k: float(v) for k, v in m.compute().items()}
    mine = {k: float(v.mean()) for k, v in per_case(ranked, target).items()}
    assert mine == pytest.approx(ref)


def _cases(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A model right on the first 60 % of the cases, a baseline right on the first 20 %."""
    target = np.arange(n)
    model = np.tile(np.arange(10) + 10_000, (n, 1))
    base = model.copy()
    model[: int(0.6 * n), 0] = target[: int(0.6 * n)]
    base[: int(0.2 * n), 0] = target[: int(0.2 * n)]
    return target, model, base


def test_a_known_difference_is_inside_its_interval_and_beats() -> None:
    target, model, base = _cases(500)
    values = {"model": per_case(model, target), "base": per_case(base, target)}
    out = paired_bootstrap(values, "model", resamples=1000, seed=1)
    d = out["differences"]["base"]["acc@1"]
    assert d["diff"] == pytest.approx(0.4)
    lo, hi = d["ci"]
    assert lo < 0.4 < hi and lo > 0 and d["above_zero"]
    # Paired: the difference's interval is that of a 40 % share of 500 cases (sd ~0.022), far narrower
    # than two independent intervals would give.
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.4 * 0.6 / 500), rel=0.2)
    lo_m, hi_m = out["intervals"]["model"]["acc@1"]
    assert lo_m < 0.6 < hi_m
    # Seeded: the same draws give the same intervals.
    assert paired_bootstrap(values, "model", resamples=1000, seed=1) == out


def test_an_exact_tie_never_beats() -> None:
    target, model, _ = _cases(300)
    values = {"model": per_case(model, target), "twin": per_case(model.copy(), target)}
    d = paired_bootstrap(values, "model", resamples=500, seed=0)["differences"]["twin"]
    for m in ("acc@1", "ndcg@5"):
        assert d[m]["diff"] == 0 and d[m]["ci"] == [0.0, 0.0] and not d[m]["above_zero"]


def test_results_table_carries_intervals_and_beats_marks() -> None:
    target, model, base = _cases(400)
    cases = pl.DataFrame({"task": ["next"] * 400, "target_loc": target})
    rankings = {"QT-Mob (x)": model, "weak": base, "twin": model.copy()}
    bounds = bootstrap_by_task(rankings, cases, 10, "QT-Mob (x)", resamples=300, seed=3)
    assert beaten(bounds) == {"next": ["weak"]}
    results = {"dataset": "toy", "run": "r", "cases": {"next": 400}, "reference": "QT-Mob (x)", "intervals": bounds,
               "metrics": {name: score_by_task(r, cases, 10) for name, r in rankings.items()},
               "hit_split": hit_split(rankings, cases, "QT-Mob (x)")}
    md = results_markdown(results)
    # The model is right on the first 60 %, the weak row on the first 20 %: only the model on 40 %, never the row alone.
    assert "| yes | 0.400 / 0.000 |" in md and "| no | 0.000 / 0.000 |" in md
    assert "0.6000 (" in md and "95 % paired bootstrap interval, 300 resamples, seed 3" in md
    assert "| next-location | weak | +0.4000" in md and "| yes |" in md
    assert "| next-location | twin | +0.0000 (+0.000 to +0.000) |" in md
    assert "QT-Mob (x) beats weak (" in md


def test_first_guesses_say_whether_a_row_copies_the_last_visit() -> None:
    """Four next-location cases (one recovery case left out): a row that always names the prompt's last
    visit, against the targets' own sources."""
    cases = pl.DataFrame({
        "task": ["next", "next", "next", "next", "recovery_single"],
        "target_loc": [3, 1, 9, 2, 5],
        "context": [[1, 2, 3], [1, 2], [4], [], [5]],
    })
    copy_last = np.array([[3, 0], [2, 0], [4, 0], [7, 0], [5, 0]])   # the last visit (none in case 4)
    guesses = first_guesses({"copy_last": copy_last, "oracle": cases["target_loc"].to_numpy()[:, None]}, cases)["next"]
    # targets: case 1 returns to the last visit, case 2 to an earlier one, cases 3-4 go elsewhere
    assert guesses["targets"] == {"last visit": 0.25, "earlier visit": 0.25, "elsewhere": 0.5}
    # the copier names the last visit in 3 of 4 cases and is right in 1 of them; its 4th guess is elsewhere and wrong
    assert guesses["copy_last"] == {"last visit": [0.75, 0.3333], "earlier visit": [0.0, None], "elsewhere": [0.25, 0.0]}
    assert guesses["oracle"]["last visit"] == [0.25, 1.0] and guesses["oracle"]["elsewhere"] == [0.5, 1.0]
    md = results_markdown({"dataset": "toy", "run": "r", "cases": {"next": 4}, "metrics": {},
                           "first_guesses": {"next": guesses}})
    assert "| targets | 0.250 | 0.250 | 0.500 |" in md and "| copy_last | 0.750 (0.333) | 0.000 | 0.250 (0.000) |" in md
    assert first_guesses({"x": copy_last[4:]}, cases[4:]) == {}


def test_hit_split_parts_add_up_to_the_acc1_difference() -> None:
    """Two rows that know different cases: each right on its own 30 %, both on 10 %."""
    n = 200
    target = np.arange(n)
    a = np.full((n, 10), -1)
    b = a.copy()
    a[:80, 0] = target[:80]                                   # cases 0-79
    b[60:140, 0] = target[60:140]                             # cases 60-139 (20 shared)
    cases = pl.DataFrame({"task": ["next"] * n, "target_loc": target})
    split = hit_split({"a": a, "b": b}, cases, "a")["next"]["b"]
    assert split == {"reference_only": 0.3, "row_only": 0.3, "both": 0.1}
    assert split["reference_only"] - split["row_only"] == pytest.approx(
        score_by_task(a, cases, 10)["next"]["acc@1"] - score_by_task(b, cases, 10)["next"]["acc@1"])
    assert hit_split({"a": a}, cases, None) == {}
