"""Assemble a dataset from its config: read → (protocol) → location table → texts.

This is the one place that knows the ``data.format`` options; everything downstream sees a
:class:`MobilityData` bundle with canonical check-ins carrying ``loc_id``, the location table with
descriptions, and user profiles.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from omegaconf.errors import MissingMandatoryValue

from datamodules.categories import fill_parent_categories
from datamodules.descriptions import (
    DescriptionConfig,
    build_locations,
    generate_descriptions,
    generate_profiles,
    short_description,
)
from datamodules.download import SOURCES, ensure_dataset
from datamodules.errors import DataError, Quarantine
from datamodules.protocol import ProtocolConfig, apply_protocol
from datamodules.readers.qtmob_release import read_qtmob_release, read_release_profiles
from datamodules.readers.raw_formats import read_gowalla, read_tsmc
from datamodules.readers.synthetic import generate_city
from datamodules.samples import SampleConfig

log = logging.getLogger(__name__)

FORMATS = ("qtmob_release", "tsmc", "gowalla", "synthetic")


@dataclass
class MobilityData:
    """A dataset ready for the later stages.

    Attributes:
        name: Dataset key (``data.name``), used in artefact paths.
        checkins: Canonical check-ins with ``traj_id``, ``split`` and ``loc_id``.
        locations: One row per location: ``loc_id``, facts, ``train_visits``, ``description``,
            ``short_description``. Includes described locations without visits (the release has one).
        profiles: ``user_id, profile``.
        quarantine: Malformed input rows.
        protocol_stats: Rows dropped per protocol step (raw formats only).
    """

    name: str
    checkins: pl.DataFrame
    locations: pl.DataFrame
    profiles: pl.DataFrame
    quarantine: Quarantine
    protocol_stats: dict[str, int] = field(default_factory=dict)


def _sub(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for dicts and OmegaConf nodes alike, ``default`` when absent or null."""
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    except MissingMandatoryValue:  # a `???` the user has not filled in
        value = None
    return default if value is None else value


def _dataclass_from(cls: type, cfg: Any) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = _sub(cfg, f.name) if cfg is not None else None
        if value is not None:
            kwargs[f.name] = tuple(value) if isinstance(f.default, tuple) else value
    return cls(**kwargs)


def protocol_config(data_cfg: Any) -> ProtocolConfig:
    """The :class:`ProtocolConfig` of a ``data`` config."""
    return _dataclass_from(ProtocolConfig, _sub(data_cfg, "protocol"))


def description_config(data_cfg: Any) -> DescriptionConfig:
    """The :class:`DescriptionConfig` of a ``data`` config."""
    return _dataclass_from(DescriptionConfig, _sub(data_cfg, "descriptions"))


def sample_config(data_cfg: Any) -> SampleConfig:
    """The :class:`SampleConfig` of a ``data`` config."""
    return _dataclass_from(SampleConfig, _sub(data_cfg, "samples"))


def _root(data_cfg: Any) -> Path:
    root = _sub(data_cfg, "root")
    if root is None:
        raise DataError(
            f"data.root is not set for data={_sub(data_cfg, 'name')} (format {_sub(data_cfg, 'format')}); "
            "pass data.root=<folder holding the files> (add data.download=true to fetch them there)."
        )
    return Path(str(root)).expanduser()


def _ensure(data_cfg: Any, root: Path) -> None:
    """Download the dataset when asked to and absent (a no-op when its files are there)."""
    source = _sub(data_cfg, "source")
    if source is None or source not in SOURCES:
        return
    src = SOURCES[source]
    file = _sub(data_cfg, "file")
    # A user may hold the plain text instead of the .gz SNAP ships (or the reverse).
    if file and ((root / file).is_file() or (root / str(file).removesuffix(".gz")).is_file()):
        return
    ensure_dataset(src, root, download=bool(_sub(data_cfg, "download", False)))


def _raw_file(root: Path, file: str) -> Path:
    plain = root / str(file).removesuffix(".gz")
    return plain if plain.is_file() else root / file


def input_files(data_cfg: Any) -> list[Path]:
    """The files a ``data`` config reads (none for the synthetic city; every file of a release folder).

    Hidden files and macOS archive debris are not inputs. Missing files are simply absent here: loading
    them reports the problem."""
    fmt = _sub(data_cfg, "format")
    if fmt == "synthetic" or _sub(data_cfg, "root") is None:
        return []
    root = _root(data_cfg)
    if fmt == "qtmob_release":
        if not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file()
                      and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    files = [_raw_file(root, _sub(data_cfg, "file"))] if _sub(data_cfg, "file") else []
    if _sub(data_cfg, "categories"):
        files.append(Path(str(_sub(data_cfg, "categories"))))
    return [f for f in files if f.is_file()]


def prepare_inputs(data_cfg: Any) -> None:
    """Download the dataset first when asked to (``data.download=true``), so that the data fingerprint,
    which hashes the input files, is computed on the files the stage will read."""
    if _sub(data_cfg, "download", False) and _sub(data_cfg, "root") is not None and _sub(data_cfg, "format") != "synthetic":
        _ensure(data_cfg, _root(data_cfg))


def load_dataset(data_cfg: Any) -> MobilityData:
    """Read and prepare the dataset a ``data`` config describes.

    Args:
        data_cfg: The ``data`` config node (see ``experiments/data/*.yaml``).

    Returns:
        The assembled :class:`MobilityData`.

    Raises:
        DataError: for missing, malformed or too-small input (never a traceback).
    """
    fmt = _sub(data_cfg, "format")
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {list(FORMATS)}")
    quarantine = Quarantine(max_bad_fraction=float(_sub(data_cfg, "max_bad_fraction", 0.01)))
    name = str(_sub(data_cfg, "name", fmt))
    desc_cfg = description_config(data_cfg)
    descriptions = _sub(data_cfg, "descriptions", {})
    desc_source = _sub(descriptions, "source", "generate")

    if fmt == "qtmob_release":
        root = _root(data_cfg)
        _ensure(data_cfg, root)
        folder = "prompts_refined" if desc_source == "refined" else "prompts"
        checkins, described = read_qtmob_release(root, quarantine, _sub(data_cfg, "timezone", "America/New_York"), folder)
        checkins = checkins.with_columns(loc_id=pl.col("poi_id").cast(pl.Int64))
        visited = build_locations(checkins, checkins.select("poi_id", "loc_id").unique())
        # Every described location is part of the catalogue, visited or not (the release describes
        # 5,765 ids; 5,764 occur in its trajectories).
        locations = (
            described.drop("description")
            .join(visited.select("loc_id", "poi_id", "train_visits", "train_users"), on="loc_id", how="left")
            .with_columns(
                poi_id=pl.coalesce("poi_id", pl.col("loc_id").cast(pl.String)),
                train_visits=pl.col("train_visits").fill_null(0),
                train_users=pl.col("train_users").fill_null(0),
            )
            .select(visited.columns)
        )
        if desc_source == "generate":
            locations = generate_descriptions(locations, desc_cfg)
        else:
            text = described.select("loc_id", "description")
            locations = locations.join(text, on="loc_id", how="left")
            locations = locations.with_columns(short_description=short_description(locations["description"]))
        if _sub(data_cfg, "profiles", "release") == "release":
            profiles = read_release_profiles(root)
        else:
            profiles = generate_profiles(checkins, locations, desc_cfg.top_k_profile)
        return MobilityData(name, checkins, locations, profiles, quarantine)

    if fmt == "synthetic":
        city = _sub(data_cfg, "city", {})
        raw = generate_city(
            seed=int(_sub(city, "seed", 0)),
            n_users=int(_sub(city, "n_users", 60)),
            n_pois=int(_sub(city, "n_pois", 300)),
            days=int(_sub(city, "days", 60)),
            # The habit knobs (ranges drawn per user); absent keys keep the generator's defaults.
            **{k: tuple(float(x) for x in _sub(city, k)) for k in ("explore", "home_am", "home_pm") if _sub(city, k) is not None},
        )
    elif fmt == "tsmc":
        root = _root(data_cfg)
        _ensure(data_cfg, root)
        raw = read_tsmc(_raw_file(root, _sub(data_cfg, "file")), quarantine, encoding=str(_sub(data_cfg, "encoding", "auto")),
                        drop_duplicates=bool(_sub(data_cfg, "drop_duplicates", False)))
    else:  # gowalla
        root = _root(data_cfg)
        _ensure(data_cfg, root)
        bbox = _sub(data_cfg, "bbox")
        categories = _sub(data_cfg, "categories")
        raw = read_gowalla(
            _raw_file(root, _sub(data_cfg, "file")),
            quarantine,
            bbox=list(bbox) if bbox is not None else None,
            categories=Path(str(categories)) if categories else None,
            timezone=_sub(data_cfg, "timezone"),
            encoding=str(_sub(data_cfg, "encoding", "utf-8")),
            drop_duplicates=bool(_sub(data_cfg, "drop_duplicates", False)),
        )
    raw = fill_parent_categories(raw)
    checkins, stats = apply_protocol(raw, protocol_config(data_cfg))
    locations = build_locations(checkins)
    checkins = checkins.join(locations.select("poi_id", "loc_id"), on="poi_id", how="left")
    locations = generate_descriptions(locations, desc_cfg)
    profiles = generate_profiles(checkins, locations, desc_cfg.top_k_profile)
    return MobilityData(name, checkins, locations, profiles, quarantine, stats)
