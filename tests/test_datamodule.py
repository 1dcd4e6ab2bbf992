"""MobilityDataModule: location table, mixed-task loaders, task mixture sampling."""

from __future__ import annotations

from collections import Counter

import pytest

import run as run_module
from pipeline.paths import data_dir
from datamodules.errors import DataError
from datamodules.mobility_datamodule import MobilityDataModule, TaskMixtureSampler, default_codes
from tests.conftest import compose_cfg


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    art = tmp_path_factory.mktemp("art")
    cfg = compose_cfg(["experiment=smoke", "stage=data", f"paths.artifacts={art}"])
    run_module.run(cfg)
    return data_dir(cfg)


def test_location_table_and_loader(smoke_data) -> None:
    dm = MobilityDataModule(smoke_data)
    table = dm.location_table()
    assert table["loc_id"].is_unique().all() and table["description"].null_count() == 0
    batches = list(dm.location_dataloader(batch_size=50))
    assert sum(len(b) for b in batches) == table.height
    assert [r["loc_id"] for r in batches[0]] == table["loc_id"].head(len(batches[0])).to_list()


def test_samples_need_codes(smoke_data) -> None:
    with pytest.raises(DataError, match="codes"):
        MobilityDataModule(smoke_data).train_dataloader()


def test_mixed_task_batches(smoke_data) -> None:
    dm = MobilityDataModule(smoke_data, batch_size=16, seed=1)
    dm.setup()
    dm.codes = default_codes(dm.locations)
    train = dm.samples("train")
    epoch = [row for batch in dm.train_dataloader() for row in batch]
    # Natural proportions: every training sample exactly once per epoch, tasks mixed within batches.
    assert len(epoch) == train.height
    assert Counter(r["task"] for r in epoch) == Counter(train["task"].to_list())
    first = next(iter(dm.train_dataloader()))
    assert len({r["task"] for r in first}) >= 2
    assert {r["split"] for r in next(iter(dm.val_dataloader()))} == {"valid"}
    test_tasks = {r["task"] for b in dm.test_dataloader() for r in b}
    assert test_tasks == {"next", "recovery_single"}


def test_task_filter(smoke_data) -> None:
    dm = MobilityDataModule(smoke_data, tasks=["next"])
    dm.setup()
    dm.codes = default_codes(dm.locations)
    assert set(dm.samples("train")["task"]) == {"next"}
    with pytest.raises(DataError, match="unknown tasks"):
        MobilityDataModule(smoke_data, tasks=["nope"])


def test_weighted_mixture_proportions() -> None:
    tasks = ["next"] * 900 + ["translation"] * 100
    sampler = TaskMixtureSampler(tasks, {"next": 1.0, "translation": 1.0}, num_samples=4000, seed=0)
    counts = Counter(tasks[i] for i in sampler)
    assert abs(counts["translation"] / 4000 - 0.5) < 0.03
    # Epochs differ, runs repeat.
    sampler.set_epoch(1)
    a = list(sampler)
    sampler.set_epoch(1)
    assert a == list(sampler)
    sampler.set_epoch(2)
    assert a != list(sampler)
    with pytest.raises(DataError):
        TaskMixtureSampler(tasks, {"next": 0.0})
