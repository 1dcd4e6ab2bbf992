"""``stage=data``: read the dataset, apply the protocol, build texts and the sample index, and
write them with a summary to ``<paths.artifacts>/<data.name>/data-<fingerprint>/``.

Artefacts (written atomically as one folder):
``checkins.parquet``, ``locations.parquet`` (with descriptions), ``profiles.parquet``,
``sample_index.parquet`` (which samples exist; text is rendered once codes exist),
``quarantine.csv`` (malformed input rows with file, line and reason) and ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import polars as pl

from datamodules.artifacts import atomic_dir, file_manifest, reusable, write_json_atomic
from datamodules.dataset import MobilityData, load_dataset, prepare_inputs
from datamodules.samples import build_sample_index, count_samples
from datamodules.schema import SPLITS
from pipeline.config import RunConfig, load_config
from pipeline.paths import data_dir, data_fingerprint, input_manifest

log = logging.getLogger(__name__)

DATA_FILES = ("checkins.parquet", "locations.parquet", "profiles.parquet", "sample_index.parquet", "summary.json")


def summarize(data: MobilityData, index: pl.DataFrame) -> dict[str, Any]:
    """Counts per split, samples per task and split, quarantine and protocol figures."""
    c = data.checkins
    per_split = {}
    for split in SPLITS:
        part = c.filter(pl.col("split") == split)
        per_split[split] = {
            "checkins": part.height,
            "trajectories": part["traj_id"].n_unique(),
            "users": part["user_id"].n_unique(),
            "locations": part["poi_id"].n_unique(),
        }
    return {
        "dataset": data.name,
        "checkins": c.height,
        "trajectories": c["traj_id"].n_unique(),
        "users": c["user_id"].n_unique(),
        "locations": c["poi_id"].n_unique(),
        "described_locations": data.locations.filter(pl.col("description").is_not_null()).height,
        "splits": per_split,
        "samples": count_samples(index),
        "quarantined_rows": data.quarantine.count(),
        "quarantine": data.quarantine.summary(),
        "protocol": data.protocol_stats,
        "time_range_local": [str(c["local_time"].min()), str(c["local_time"].max())],
    }


def run_data_stage(cfg: RunConfig, force: bool | None = None) -> dict[str, Any]:
    """Run (or skip, when its artefacts match the config) the data stage.

    Args:
        cfg: The composed run config.
        force: Recompute even if the artefacts match (default: ``cfg.force``).

    Returns:
        The summary (also written to ``summary.json``).
    """
    cfg = load_config(cfg)
    prepare_inputs(cfg.data)  # a download first, so the fingerprint hashes what will be read
    out = data_dir(cfg)
    fp = data_fingerprint(cfg)
    force = cfg.force if force is None else force
    if (old := reusable(out, "summary.json", DATA_FILES, fp, force, "data")) is not None:
        return old
    t0 = time.perf_counter()
    data = load_dataset(cfg.data)
    index = build_sample_index(data.checkins, data.locations.filter(pl.col("description").is_not_null())["loc_id"], cfg.data.samples)
    summary = {"fingerprint": fp, **summarize(data, index), "inputs": input_manifest(cfg)}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    with atomic_dir(out) as tmp:
        data.checkins.write_parquet(tmp / "checkins.parquet")
        data.locations.write_parquet(tmp / "locations.parquet")
        data.profiles.write_parquet(tmp / "profiles.parquet")
        index.write_parquet(tmp / "sample_index.parquet")
        data.quarantine.table().write_csv(tmp / "quarantine.csv")
        summary["quarantine_file"] = str(out / "quarantine.csv")
        summary["manifest"] = file_manifest(tmp, [f for f in DATA_FILES if f != "summary.json"] + ["quarantine.csv"])
        write_json_atomic(tmp / "summary.json", summary)
    log.info(
        "data: %s check-ins, %s trajectories, %s users, %s locations, %s quarantined rows -> %s",
        summary["checkins"], summary["trajectories"], summary["users"], summary["locations"],
        summary["quarantined_rows"], out,
    )
    return summary
