"""The QT-Mob NYC release end to end through `stage=data`: the exact published counts."""

from __future__ import annotations

import json

import polars as pl
import pytest

import run as run_module
from pipeline.paths import data_dir
from datamodules.errors import Quarantine
from datamodules.readers.qtmob_release import read_loc2id, read_qtmob_release
from datamodules.schema import CHECKIN_SCHEMA
from tests.conftest import compose_cfg


def test_reader_gives_the_published_counts(nyc_release) -> None:
    q = Quarantine()
    checkins, descriptions = read_qtmob_release(nyc_release, q)
    assert dict(checkins.schema) == CHECKIN_SCHEMA
    assert checkins.height == 66_504
    assert checkins["traj_id"].n_unique() == 11_297
    per_split = dict(checkins.group_by("split").agg(pl.col("traj_id").n_unique()).iter_rows())
    assert per_split == {"train": 7_599, "valid": 1_000, "test": 2_698}
    assert checkins["user_id"].n_unique() == 1_055
    assert checkins["poi_id"].n_unique() == 5_764
    assert descriptions.height == 5_765
    assert q.count() == 0
    # Local times as published; UTC derived through America/New_York (EDT in April = UTC-4).
    first = checkins.row(0, named=True)
    assert str(first["local_time"]) == "2012-04-08 16:02:10"
    assert str(first["utc_time"].replace(tzinfo=None)) == "2012-04-08 20:02:10"
    assert first["name"] == "Hi-Life Bar & Grill" and first["parent_category"] == "Nightlife Spot"
    assert checkins["category"].null_count() == 0


def test_loc2id_refuses_code_objects(tmp_path) -> None:
    import pickle

    from datamodules.errors import DataError

    evil = tmp_path / "loc2id"
    evil.write_bytes(pickle.dumps({(1.0, 2.0): 0, "x": pl.DataFrame}))
    with pytest.raises(DataError, match="loc2id"):
        read_loc2id(evil)


def test_data_stage_summary_has_the_exact_counts(nyc_release, tmp_path) -> None:
    cfg = compose_cfg(["experiment=nyc_qlora", "stage=data", f"data.root={nyc_release}", f"paths.artifacts={tmp_path}"])
    results = run_module.run(cfg)
    out = data_dir(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(results["data"]))
    assert summary["checkins"] == 66_504
    assert summary["trajectories"] == 11_297
    assert {s: v["trajectories"] for s, v in summary["splits"].items()} == {"train": 7_599, "valid": 1_000, "test": 2_698}
    assert summary["users"] == 1_055 and summary["locations"] == 5_764
    samples = summary["samples"]
    assert samples["next"]["train"] == 32_845
    assert samples["next"]["test"] == 2_698
    assert samples["index2loc"]["train"] == samples["loc2index"]["train"] == 5_765
    assert samples["translation"]["train"] == 7_599
    assert samples["recovery_multi"]["train"] == 7_599
    # Single-mask recovery: 20-50 % of positions 1..L-1 of <= 20 visits -> between these bounds.
    assert 7_599 <= samples["recovery_single"]["train"] <= 48_043 // 2
    assert "test" in samples["recovery_single"]
    assert summary["quarantined_rows"] == 0
    for name in ("checkins.parquet", "locations.parquet", "profiles.parquet", "sample_index.parquet", "quarantine.csv"):
        assert (out / name).is_file()
    # A second run with the same config reuses the artefacts.
    before = (out / "checkins.parquet").stat().st_mtime_ns
    run_module.run(cfg)
    assert (out / "checkins.parquet").stat().st_mtime_ns == before


def test_parent_categories_match_the_release_taxonomy(nyc_release) -> None:
    """Raw TSMC rows carry only the leaf category; our parent map must agree with the release's."""
    from datamodules.categories import PARENTS, parent_of

    q = Quarantine()
    _, descriptions = read_qtmob_release(nyc_release, q)
    pairs = descriptions.select("category", "parent_category").unique().filter(pl.col("parent_category").is_in(list(PARENTS)))
    agree = sum(parent_of(c) == p for c, p in pairs.iter_rows())
    assert pairs.height > 250
    assert agree / pairs.height >= 0.98, [(c, p, parent_of(c)) for c, p in pairs.iter_rows() if parent_of(c) != p]
