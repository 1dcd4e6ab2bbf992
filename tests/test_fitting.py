"""The one length rule of training and test: an over-long prompt loses its oldest visits, never the
profile, the question or the answer (a long synthetic user)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from datamodules.config import SampleConfig
from datamodules.fitting import fit_history
from datamodules.rendering import render_samples
from datamodules.samples import build_sample_index

PROFILE = "PROFILE-START " + "likes coffee and late dinners " * 10 + "PROFILE-END"


def _long_user(n_visits: int = 60) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One user with one long train trajectory (and a short test one), codes and a long profile."""
    t0 = datetime(2024, 1, 1, 6, 0)
    rows = [("u1", "train_0", "train", t0 + timedelta(minutes=20 * i), 100 + i % 17) for i in range(n_visits)]
    rows += [("u1", "test_0", "test", t0 + timedelta(days=30, minutes=20 * i), 100 + i) for i in range(n_visits)]
    visits = pl.DataFrame(rows, schema=["user_id", "traj_id", "split", "local_time", "loc_id"], orient="row").with_columns(
        utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64)
    )
    codes = pl.DataFrame({"loc_id": list(range(100, 100 + n_visits))}).with_columns(
        code=pl.format("<a_{}><b_{}>", pl.col("loc_id") % 7, pl.col("loc_id"))
    )
    profiles = pl.DataFrame({"user_id": ["u1"], "profile": [PROFILE]})
    return visits, codes, profiles


def _words(samples: pl.DataFrame) -> np.ndarray:
    """A stand-in tokenizer: one token per whitespace-separated word of prompt and answer."""
    text = samples.select(pl.concat_str(["prompt", "response_prefix", "target"], separator=" ")).to_series()
    return text.str.split(" ").list.len().to_numpy()


@pytest.fixture(scope="module")
def long_user():
    visits, codes, profiles = _long_user()
    cfg = SampleConfig(max_history=50, recovery_max_len=50)
    index = build_sample_index(visits, None, cfg, tasks=("next", "recovery_single"))
    render = lambda ix: render_samples(ix, visits, codes, None, profiles, cfg)  # noqa: E731
    return index, render


def test_a_long_prompt_loses_its_oldest_visits_only(long_user) -> None:
    index, render = long_user
    samples = render(index)
    before = _words(samples)
    limit = 300
    fitted, cut = fit_history(index, samples, render, _words, limit)
    after = _words(fitted)
    assert fitted["sample_id"].to_list() == samples["sample_id"].to_list(), "same samples, same order"
    assert (after <= limit).all(), after.max()
    over = before > limit
    assert over.sum() > 0 and cut["next"] + cut["recovery_single"] == int(over.sum())
    untouched = ~over
    assert fitted.filter(pl.Series(untouched))["prompt"].to_list() == samples.filter(pl.Series(untouched))["prompt"].to_list()
    for old, new in zip(samples.filter(pl.Series(over)).iter_rows(named=True), fitted.filter(pl.Series(over)).iter_rows(named=True)):
        assert new["target"] == old["target"] and new["response_prefix"] == old["response_prefix"]
        assert "PROFILE-START" in new["prompt"] and "PROFILE-END" in new["prompt"], "the profile is never cut"
        question = old["prompt"][old["prompt"].rindex(".") + 1 :]
        assert new["prompt"].endswith(question), "the question is never cut"
        old_visits = old["prompt"].split("At time ")[1:]
        new_visits = new["prompt"].split("At time ")[1:]
        assert 1 <= len(new_visits) < len(old_visits)
        kept, seen = [v[:19] for v in new_visits], [v[:19] for v in old_visits]
        if new["task"] == "next":
            assert kept == seen[-len(kept):], "a next-location prompt keeps its most recent visits"
        else:
            # A contiguous part of the window around the masked target: the oldest visits go first,
            # then (when the mask is early) the newest after it.
            first = seen.index(kept[0])
            assert kept == seen[first : first + len(kept)] and "[MASK]" in new["prompt"]
            assert first == min(first, seen.index(next(v[:19] for v in old_visits if "[MASK]" in v)))
    # Tight: one visit fewer than needed would not fit (the cut is minimal up to one visit).
    sid = int(fitted.filter(pl.Series(over))["sample_id"][0])
    assert after[samples["sample_id"].to_list().index(sid)] > limit - 2 * 40


def test_nothing_changes_when_everything_fits(long_user) -> None:
    index, render = long_user
    samples = render(index)
    fitted, cut = fit_history(index, samples, render, _words, 10_000)
    assert fitted.equals(samples) and not any(cut.values())


def test_a_sample_that_cannot_fit_keeps_one_visit(long_user) -> None:
    index, render = long_user
    samples = render(index)
    fitted, _ = fit_history(index, samples, render, _words, 20)  # less than the profile alone
    nxt = fitted.filter(pl.col("task") == "next")
    assert all(len(p.split("At time ")) == 2 for p in nxt["prompt"].to_list()), "one visit is left, then the encoder decides"
