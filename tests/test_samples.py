"""Task samples: structure, masking rules, rendering, determinism."""

from __future__ import annotations

import json

import polars as pl
import pytest

from datamodules.config import SampleConfig
from datamodules.dataset import load_dataset
from datamodules.mobility_datamodule import default_codes
from datamodules.prompts import MASK, UNKNOWN
from datamodules.rendering import render_samples
from datamodules.samples import build_sample_index, count_samples
from tests.conftest import compose_run


@pytest.fixture(scope="module")
def city():
    cfg = compose_run(["experiment=smoke"])
    return load_dataset(cfg.data)


@pytest.fixture(scope="module")
def index(city):
    return build_sample_index(city.checkins, city.locations["loc_id"], SampleConfig(seed=3))


def test_next_location_windows(city, index) -> None:
    lengths = dict(city.checkins.group_by("traj_id").len().iter_rows())
    nxt = index.filter(pl.col("task") == "next")
    train = nxt.filter(pl.col("split") == "train")
    expected = sum(n - 2 for t, n in lengths.items() if t.startswith("train_") and n > 2)
    assert train.height == expected  # every prefix with >= 2 visits of history
    assert (train["end"] == train["target_pos"]).all()
    assert ((train["end"] - train["start"]) <= 20).all() and (train["target_pos"] >= 2).all()
    test = nxt.filter(pl.col("split") == "test")
    assert test.height == sum(1 for t in lengths if t.startswith("test_"))
    assert all(tp == lengths[t] - 1 for t, tp in test.select("traj_id", "target_pos").iter_rows())
    assert (test["template"] == 0).all()


def test_recovery_masks_follow_the_rules(city, index) -> None:
    lengths = dict(city.checkins.group_by("traj_id").len().iter_rows())
    for task in ("recovery_multi", "recovery_single"):
        rows = index.filter(pl.col("task") == task)
        assert rows.height
        for traj, masked, end in rows.select("traj_id", "masked", "end").iter_rows():
            lh = min(lengths[traj], 20)
            assert end == lh
            assert 0 not in masked and all(1 <= p < lh for p in masked) and len(set(masked)) == len(masked)
            assert max(1, int(0.2 * lh)) <= len(masked) <= max(1, int(0.5 * lh))
    single = index.filter(pl.col("task") == "recovery_single")
    assert all(tp in m for tp, m in single.select("target_pos", "masked").iter_rows())
    assert "test" not in set(index.filter(pl.col("task") == "recovery_multi")["split"])


def test_index_is_deterministic_and_seeded(city) -> None:
    a = build_sample_index(city.checkins, city.locations["loc_id"], SampleConfig(seed=3))
    b = build_sample_index(city.checkins, city.locations["loc_id"], SampleConfig(seed=3))
    c = build_sample_index(city.checkins, city.locations["loc_id"], SampleConfig(seed=4))
    assert a.equals(b)
    assert not a.filter(pl.col("task") == "recovery_single").equals(c.filter(pl.col("task") == "recovery_single"))
    assert count_samples(a)["next"] == count_samples(c)["next"]


def test_rendered_text(city, index) -> None:
    codes = default_codes(city.locations)
    out = render_samples(index, city.checkins, codes, city.locations, city.profiles)
    assert out.height == index.height
    assert out.select(pl.col("prompt", "target").null_count().sum()).row(0) == (0, 0)
    code_of = dict(codes.iter_rows())
    visits = city.checkins.sort("traj_id", "utc_time")
    nxt = out.filter((pl.col("task") == "next") & (pl.col("split") == "test")).row(0, named=True)
    assert nxt["target"] == code_of[nxt["target_loc"]]
    assert nxt["prompt"].startswith(f"User {nxt['user_id']} has the following profile: ")
    assert nxt["response_prefix"].endswith("will visit POI index ")
    # The history is exactly the visits before the target, with their codes, and never the target itself.
    traj = visits.filter(pl.col("traj_id") == nxt["traj_id"])
    last_seen = code_of[traj["loc_id"][-2]]
    assert last_seen in nxt["prompt"]
    assert str(traj["local_time"][-1])[:19] in nxt["response_prefix"]

    single = out.filter(pl.col("task") == "recovery_single").row(0, named=True)
    assert single["prompt"].count(MASK) >= 1 + single["prompt"].count("[MASK] marks")  # one [MASK] visit
    assert single["target"] == code_of[single["target_loc"]]
    multi = out.filter(pl.col("task") == "recovery_multi").row(0, named=True)
    assert MASK in multi["prompt"] and UNKNOWN not in multi["prompt"].split(": ", 1)[1]
    assert MASK not in multi["target"] and multi["target"].count("visited POI index") >= 3

    loc2index = out.filter(pl.col("task") == "loc2index").row(0, named=True)
    assert loc2index["target"] == code_of[loc2index["target_loc"]]
    index2loc = out.filter(pl.col("task") == "index2loc").row(0, named=True)
    assert index2loc["target"].startswith(("The name of this location", "This location's POI category"))
    trans = out.filter(pl.col("task") == "translation").row(0, named=True)
    assert trans["prompt"].count("Location Description:") == trans["target"].count("visited POI index")
    assert trans["target"].startswith("[ 1 ] At time")


def test_compact_visits_keep_every_fact_but_the_date(city, index) -> None:
    """visit_text=compact writes each visit as weekday, hour:minute and code; the samples, their
    order, answers and masks are those of the official rendering."""
    codes = default_codes(city.locations)
    official = render_samples(index, city.checkins, codes, city.locations, city.profiles)
    compact = render_samples(index, city.checkins, codes, city.locations, city.profiles, SampleConfig(visit_text="compact"))
    same = ["sample_id", "task", "split", "traj_id", "user_id", "target_loc", "template"]
    assert compact.select(same).equals(official.select(same))
    nxt = compact.filter((pl.col("task") == "next") & (pl.col("split") == "test")).row(0, named=True)
    traj = city.checkins.filter(pl.col("traj_id") == nxt["traj_id"]).sort("utc_time")
    code_of = dict(codes.iter_rows())
    before = traj["local_time"][-2]
    assert f"{before.strftime('%a %H:%M')} {code_of[traj['loc_id'][-2]]}." in nxt["prompt"]
    assert nxt["target"] == code_of[nxt["target_loc"]]
    assert traj["local_time"][-1].strftime("%a %H:%M") in nxt["response_prefix"]
    assert "visited POI index" not in nxt["prompt"] and ":00:" not in nxt["prompt"].split("profile")[-1][-200:]
    single = compact.filter(pl.col("task") == "recovery_single").row(0, named=True)
    assert f" {MASK}." in single["prompt"] and single["target"] == code_of[single["target_loc"]]
    # the answers are identical; the visits (the prompts without the profile) take half the characters
    sub = pl.col("task").is_in(["next", "recovery_single"])
    assert compact.filter(sub)["target"].equals(official.filter(sub)["target"])
    chars = [render_samples(index, city.checkins, codes, city.locations, None, SampleConfig(visit_text=v))
             .filter(sub)["prompt"].str.len_chars().sum() for v in ("official", "compact")]
    assert chars[1] < 0.6 * chars[0]


def test_an_unknown_visit_text_names_the_key() -> None:
    with pytest.raises(ValueError, match="data.samples.visit_text='short'.*compact"):
        SampleConfig(visit_text="short")
    with pytest.raises(ValueError, match="data.samples.next_format='all'.*trajectory"):
        SampleConfig(next_format="all")


def test_whole_trajectory_chunks_train_every_prefix_once(city) -> None:
    """next_format=trajectory: every target of the per-prefix index is trained exactly once, in a chunk
    that holds at most max_history visits before it; valid/test and the recovery masks are unchanged."""
    cfg = SampleConfig(seed=3, max_history=6, min_history=2)
    per_prefix = build_sample_index(city.checkins, city.locations["loc_id"], cfg)
    whole = build_sample_index(city.checkins, city.locations["loc_id"], SampleConfig(seed=3, max_history=6, min_history=2,
                                                                                     next_format="trajectory"))
    nxt = pl.col("task") == "next"
    train = pl.col("split") == "train"
    chunks = whole.filter(nxt & train).explode("masked")
    assert (chunks["masked"] >= chunks["start"] + 2).all() and (chunks["masked"] < chunks["end"]).all()
    assert (chunks["masked"] - chunks["start"] <= 6).all() and ((chunks["end"] - chunks["start"]) <= 7).all()
    expected = per_prefix.filter(nxt & train).select("traj_id", pos="target_pos").sort("traj_id", "pos")
    assert chunks.select("traj_id", pos=pl.col("masked")).sort("traj_id", "pos").equals(expected)
    assert chunks["traj_id"].n_unique() == expected["traj_id"].n_unique()
    assert whole.filter(nxt & train).height < expected.height / 2
    for part in (~nxt | ~train,):
        assert whole.filter(part).drop("template").equals(per_prefix.filter(part).drop("template"))


def test_continuation_answers_after_the_visits(city, index) -> None:
    codes = default_codes(city.locations)
    out = render_samples(index, city.checkins, codes, city.locations, city.profiles, SampleConfig(next_format="continuation"))
    nxt = out.filter((pl.col("task") == "next") & (pl.col("split") == "test")).row(0, named=True)
    traj = city.checkins.filter(pl.col("traj_id") == nxt["traj_id"]).sort("utc_time")
    code_of = dict(codes.iter_rows())
    assert nxt["prompt"].endswith("each with the POI index of the place visited.")
    last_time = str(traj["local_time"][-1])[:19]
    assert nxt["response_prefix"].endswith(f"At time {last_time}, user {nxt['user_id']} visited POI index ")
    assert f"visited POI index {code_of[traj['loc_id'][-2]]}." in nxt["response_prefix"]
    assert nxt["target"] == code_of[nxt["target_loc"]] and nxt["labelled_runs"] is None


def test_render_refuses_missing_codes(city, index) -> None:
    codes = default_codes(city.locations).head(3)
    with pytest.raises(ValueError, match="without a code"):
        render_samples(index, city.checkins, codes, city.locations, city.profiles)


def test_release_renders_with_released_index(nyc_release) -> None:
    cfg = compose_run(["data=qtmob_nyc", f"data.root={nyc_release}"])
    data = load_dataset(cfg.data)
    released = json.loads((nyc_release / "index_Llama-3.2-1B-Instruct.json").read_text())
    codes = pl.DataFrame({"loc_id": [int(k) for k in released], "code": ["".join(v) for v in released.values()]})
    index = build_sample_index(data.checkins, data.locations["loc_id"], SampleConfig())
    test = index.filter((pl.col("split") == "test") & (pl.col("task") == "next"))
    out = render_samples(test, data.checkins, codes, data.locations, data.profiles)
    assert out.height == 2_698
    assert out["target"].str.contains(r"^<a_\d+><b_\d+><c_\d+><d_\d+>$").all()
