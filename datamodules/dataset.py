"""Assemble a dataset from its config: read → (protocol) → location table → texts.

This is the one place that knows the ``data.format`` options; everything downstream sees a
:class:`MobilityData` bundle with canonical check-ins carrying ``loc_id``, the location table with
descriptions, and user profiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from datamodules.categories import fill_parent_categories
from datamodules.config import FORMATS, DataConfig
from datamodules.descriptions import (
    build_locations,
    generate_descriptions,
    generate_profiles,
    short_description,
)
from datamodules.download import SOURCES, ensure_dataset
from datamodules.errors import DataError, Quarantine
from datamodules.protocol import apply_protocol
from datamodules.readers.qtmob_release import read_qtmob_release, read_release_profiles
from datamodules.readers.raw_formats import read_gowalla, read_tsmc
from datamodules.readers.synthetic import generate_city

log = logging.getLogger(__name__)


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


def _root(data: DataConfig) -> Path:
    if data.root is None:
        raise DataError(
            f"data.root is not set for data={data.name} (format {data.format}); "
            "pass data.root=<folder holding the files> (add data.download=true to fetch them there)."
        )
    return Path(str(data.root)).expanduser()


def _ensure(data: DataConfig, root: Path) -> None:
    """Download the dataset when asked to and absent (a no-op when its files are there)."""
    if data.source is None or data.source not in SOURCES:
        return
    src = SOURCES[data.source]
    file = data.file
    # A user may hold the plain text instead of the .gz SNAP ships (or the reverse).
    if file and ((root / file).is_file() or (root / str(file).removesuffix(".gz")).is_file()):
        return
    ensure_dataset(src, root, download=data.download)


def _raw_file(root: Path, file: str) -> Path:
    plain = root / str(file).removesuffix(".gz")
    return plain if plain.is_file() else root / file


def input_files(data: DataConfig) -> list[Path]:
    """The files a ``data`` config reads (none for the synthetic city; every file of a release folder).

    Hidden files and macOS archive debris are not inputs. Missing files are simply absent here: loading
    them reports the problem."""
    if data.format == "synthetic" or data.root is None:
        return []
    root = _root(data)
    if data.format == "qtmob_release":
        if not root.is_dir():
            return []
        return sorted(p for p in root.rglob("*") if p.is_file()
                      and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts))
    files = [_raw_file(root, data.file)] if data.file else []
    if data.categories:
        files.append(Path(data.categories))
    return [f for f in files if f.is_file()]


def prepare_inputs(data: DataConfig) -> None:
    """Download the dataset first when asked to (``data.download=true``), so that the data fingerprint,
    which hashes the input files, is computed on the files the stage will read."""
    if data.download and data.root is not None and data.format != "synthetic":
        _ensure(data, _root(data))


def load_dataset(data: DataConfig) -> MobilityData:
    """Read and prepare the dataset a ``data`` config describes.

    Args:
        data: The ``data`` settings (``experiments/data/*.yaml``).

    Returns:
        The assembled :class:`MobilityData`.

    Raises:
        DataError: for missing, malformed or too-small input (never a traceback).
    """
    fmt = data.format
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not one of {list(FORMATS)}")
    quarantine = Quarantine(max_bad_fraction=data.max_bad_fraction)
    name = data.name
    desc_cfg = data.descriptions
    desc_source = desc_cfg.source

    if fmt == "qtmob_release":
        root = _root(data)
        _ensure(data, root)
        folder = "prompts_refined" if desc_source == "refined" else "prompts"
        checkins, described = read_qtmob_release(root, quarantine, data.timezone or "America/New_York", folder)
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
        if data.profiles == "release":
            profiles = read_release_profiles(root)
        else:
            profiles = generate_profiles(checkins, locations, desc_cfg.top_k_profile)
        return MobilityData(name, checkins, locations, profiles, quarantine)

    if fmt == "synthetic":
        city = data.city
        raw = generate_city(seed=city.seed, n_users=city.n_users, n_pois=city.n_pois, days=city.days,
                            explore=tuple(city.explore), home_am=tuple(city.home_am), home_pm=tuple(city.home_pm),
                            day_shift_h=tuple(city.day_shift_h),
                            stop_jitter_h=tuple(city.stop_jitter_h), popularity=city.popularity,
                            checkin_rate=city.checkin_rate, shared_routes=city.shared_routes)
    elif fmt == "tsmc":
        root = _root(data)
        _ensure(data, root)
        raw = read_tsmc(_raw_file(root, str(data.file)), quarantine, encoding=data.encoding, drop_duplicates=data.drop_duplicates)
    else:  # gowalla
        root = _root(data)
        _ensure(data, root)
        raw = read_gowalla(
            _raw_file(root, str(data.file)),
            quarantine,
            bbox=list(data.bbox) if data.bbox is not None else None,
            categories=Path(data.categories) if data.categories else None,
            timezone=data.timezone,
            encoding=data.encoding,
            drop_duplicates=data.drop_duplicates,
        )
    raw = fill_parent_categories(raw)
    checkins, stats = apply_protocol(raw, data.protocol)
    locations = build_locations(checkins)
    checkins = checkins.join(locations.select("poi_id", "loc_id"), on="poi_id", how="left")
    locations = generate_descriptions(locations, desc_cfg)
    profiles = generate_profiles(checkins, locations, desc_cfg.top_k_profile)
    return MobilityData(name, checkins, locations, profiles, quarantine, stats)
