"""Shared fixtures: repo paths, Hydra composition, the real NYC release (skipped when absent)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "experiments"
SHARED = Path(os.environ.get("QTMOB_SHARED", REPO.parent / "shared"))
NYC_RELEASE = SHARED / "data" / "foursquare_nyc" / "qtmob_foursquare_NYC"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.config import RunConfig, load_config  # noqa: E402 (also registers the schema run.yaml composes onto)


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``experiments/run.yaml`` with overrides, as ``python run.py`` would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="run", overrides=overrides or [], return_hydra_config=False)


def compose_run(overrides: list[str] | None = None) -> RunConfig:
    """The typed :class:`RunConfig` of ``compose_cfg(overrides)``, as the stages receive it."""
    return load_config(compose_cfg(overrides))


def run_pipeline(cfg: Any, stage: str, force: bool = False) -> dict[str, Any]:
    """What ``python run.py stage=<stage>`` does: the stages it needs first (reused when they match), then it."""
    from run import run

    return run(dataclasses.replace(load_config(cfg), stage=stage, force=force))[stage]


@pytest.fixture
def nyc_release() -> Path:
    """The official QT-Mob NYC release in ../shared (tests using it skip when it is absent)."""
    if not (NYC_RELEASE / "trips_train.csv").is_file():
        pytest.skip(f"the QT-Mob NYC release is not at {NYC_RELEASE} (set QTMOB_SHARED to the shared/ folder)")
    return NYC_RELEASE


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where converted models and tokenizers are cached (as for a user: once per machine)."""
    path = Path(os.environ.get("QTMOB_CACHE", Path.home() / ".cache" / "qtmob"))
    path.mkdir(parents=True, exist_ok=True)
    return path
