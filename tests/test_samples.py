"""Task samples: structure, masking rules, rendering, determinism."""

from __future__ import annotations

import json

import polars as pl
import pytest

from datamodules.dataset import load_dataset
from datamodules.mobility_datamodule import default_codes
from datamodules.samples import MASK, UNKNOWN, SampleConfig, build_sample_index, count_samples, render_samples
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def city():
    cfg = compose_cfg(["experiment=smoke"])
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


def test_render_refuses_missing_codes(city, index) -> None:
    codes = default_codes(city.locations).head(3)
    with pytest.raises(ValueError, match="without a code"):
        render_samples(index, city.checkins, codes, city.locations, city.profiles)


def test_release_renders_with_released_index(nyc_release) -> None:
    cfg = compose_cfg(["data=qtmob_nyc", f"data.root={nyc_release}"])
    data = load_dataset(cfg.data)
    released = json.loads((nyc_release / "index_Llama-3.2-1B-Instruct.json").read_text())
    codes = pl.DataFrame({"loc_id": [int(k) for k in released], "code": ["".join(v) for v in released.values()]})
    index = build_sample_index(data.checkins, data.locations["loc_id"], SampleConfig())
    test = index.filter((pl.col("split") == "test") & (pl.col("task") == "next"))
    out = render_samples(test, data.checkins, codes, data.locations, data.profiles)
    assert out.height == 2_698
    assert out["target"].str.contains(r"^<a_\d+><b_\d+><c_\d+><d_\d+>$").all()
