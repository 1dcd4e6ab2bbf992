"""Typed settings of the data layer: the ``data`` config group, field by field.

These dataclasses are the one source of the defaults: ``pipeline/config.py`` registers them as
Hydra's schema, so a YAML option of ``experiments/data/`` only chooses or restates a value, a typo
or a wrong type fails before any stage runs, and the library functions receive these objects, never
a Hydra node. The module imports nothing heavy (``python run.py --help`` loads it).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Optional

FORMATS = ("qtmob_release", "tsmc", "gowalla", "synthetic")
DESCRIPTION_SOURCES = ("release", "refined", "generate")
PROFILE_SOURCES = ("release", "generate")
# data.samples.visit_text and data.samples.next_format (datamodules/rendering.py writes them out).
VISIT_TEXTS = ("official", "compact")
NEXT_FORMATS = ("question", "continuation", "trajectory")


class ConfigError(ValueError):
    """A setting outside what is allowed; ``run.py`` prints it as one line before any stage runs."""


def one_of(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise a :class:`ConfigError` naming ``key`` when ``value`` is not in ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def at_least(key: str, value: float | int | None, low: float, strict: bool = False) -> None:
    """Raise a :class:`ConfigError` naming ``key`` when ``value`` is below ``low`` (or equal, with ``strict``)."""
    if value is not None and (value < low or (strict and value == low)):
        raise ConfigError(f"{key}={value!r} must be {'>' if strict else '>='} {low:g}")


@dataclass
class ProtocolConfig:
    """The STHGCN/LLM4POI protocol of the raw formats (``data.protocol``; datamodules/protocol.py)."""

    min_user_checkins: int = 10
    min_poi_checkins: int = 10
    iterative_filter: bool = False
    max_gap_hours: float = 24.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    min_traj_len: int = 3

    def __post_init__(self) -> None:
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ConfigError(f"data.protocol.split_fractions={list(self.split_fractions)} must sum to 1")


@dataclass
class DescriptionConfig:
    """Where location descriptions come from and, when generated, their radii and list lengths
    (``data.descriptions``; datamodules/descriptions.py)."""

    # release (the release's prompts/) | refined (prompts_refined/) | generate (from the train split)
    source: str = "generate"
    nearby_radius_km: float = 1.0
    n_nearby_categories: int = 10
    n_nearest: int = 10
    representative_radius_km: float = 3.0
    n_representative: int = 10
    top_k_profile: int = 5

    def __post_init__(self) -> None:
        one_of("data.descriptions.source", self.source, DESCRIPTION_SOURCES)


@dataclass
class SampleConfig:
    """Settings of the task samples (``data.samples``; datamodules/samples.py)."""

    max_history: int = 20
    min_history: int = 2
    recovery_max_len: int = 20
    mask_ratio: tuple[float, float] = (0.2, 0.5)
    add_profile: bool = True
    random_templates: bool = True
    # Next-location training draws among the paraphrases (a departure; the official code has one).
    next_paraphrases: bool = False
    # 0-based description lines left out of the token-semantic tasks (index2loc, loc2index). The
    # official default (ablation_location_prompt=1) drops line 3, the nearby-category counts.
    drop_description_lines: tuple[int, ...] = (3,)
    # The user's top-K train places as location tokens in next-location and recovery prompts (0: off,
    # the paper's; see datamodules/user_memory.py).
    user_places: int = 0
    # Beside each visit's time, the user's K most visited train places within visit_hint_hours of that time
    # of day, as tokens (0: off, the paper's; see datamodules/visit_hints.py).
    visit_hints: int = 0
    visit_hint_hours: int = 1
    # Each hinted place followed by its train visits in that window ("<code> ×12"): how strong the habit is.
    visit_hint_counts: bool = False
    # With counts: each count before its place ("×12 <code>") instead of after it. A causal model reads a
    # place's tokens after its count, so the count is already in their positions when it copies one.
    visit_hint_count_first: bool = False
    # How a hinted place is scored besides its window visits (datamodules/visit_hints.py): plus this weight
    # times the user's train visits to it at any hour (0: the window only; above 0, hints are never empty
    # for a user with train visits), and window visits on the visit's day type (weekday or weekend) counted
    # visit_hint_day_weight times (1: day type ignored). With counts, "×n" is then the rounded score.
    visit_hint_user_weight: float = 0.0
    visit_hint_day_weight: float = 1.0
    # Plus this weight times the user's train moves from the visit's previous place to the hinted place
    # (0: none): what usually follows where the user just was. Next-location tasks only (a recovery
    # sample's masked visit would show in its successor's hint; pipeline/config.py refuses the pair).
    visit_hint_moves_weight: float = 0.0
    # How a visit is written. official: "At time 2012-04-03 18:00:09, user 12 visited POI index
    # <a_1><b_2><c_3><d_4>." (36 SmolLM2 tokens, 19 of them the timestamp: numbers are split into
    # digits); compact: "Tue 18:00 <a_1><b_2><c_3><d_4>." (12 tokens; weekday and minute kept, the
    # date, seconds and the repeated user id dropped). A departure for CPU budgets; see VISIT_TEXT.
    visit_text: str = "official"
    # How next-location samples are asked. question (the official templates): the visits in the user
    # turn, a question, the target's code as the answer; one sample per prefix of a trajectory.
    # continuation: the visits are the assistant's turn and the answer is the next visit's code
    # (CONTINUATION_PROMPT); still one sample per prefix. trajectory: continuation at valid/test, but
    # training takes one sample per trajectory (chunks of max_history + 1 visits) whose loss covers the
    # code of every visit from min_history on: all prefixes in one forward pass (a departure).
    next_format: str = "question"
    seed: int = 42

    def __post_init__(self) -> None:
        one_of("data.samples.visit_text", self.visit_text, VISIT_TEXTS)
        one_of("data.samples.next_format", self.next_format, NEXT_FORMATS)
        at_least("data.samples.min_history", self.min_history, 1)
        at_least("data.samples.max_history", self.max_history, self.min_history)
        at_least("data.samples.user_places", self.user_places, 0)
        at_least("data.samples.visit_hints", self.visit_hints, 0)
        at_least("data.samples.visit_hint_hours", self.visit_hint_hours, 0)
        at_least("data.samples.visit_hint_user_weight", self.visit_hint_user_weight, 0)
        at_least("data.samples.visit_hint_day_weight", self.visit_hint_day_weight, 0)
        at_least("data.samples.visit_hint_moves_weight", self.visit_hint_moves_weight, 0)


@dataclass
class CityConfig:
    """The seeded synthetic city (``data.city``; datamodules/readers/synthetic.py). The habit knobs are
    ranges drawn per user: the probability to try a new place instead of a favourite, to check in at
    home before and after a working day, how many hours a day's schedule wanders (``day_shift_h``) and each stop on
    its own (``stop_jitter_h``); how much some venues draw everyone (``popularity``); and the share of the
    stops a user checks in at (``checkin_rate``); how often a try of somewhere new follows the city's usual
    next place (``shared_routes``)."""

    seed: int = 42
    n_users: int = 60
    n_pois: int = 300
    days: int = 120
    explore: tuple[float, float] = (0.05, 0.2)
    home_am: tuple[float, float] = (0.2, 0.7)
    home_pm: tuple[float, float] = (0.6, 0.95)
    day_shift_h: tuple[float, float] = (0.0, 0.0)
    stop_jitter_h: tuple[float, float] = (0.0, 0.0)
    popularity: float = 0.0
    checkin_rate: float = 1.0
    shared_routes: float = 0.0

    def __post_init__(self) -> None:
        at_least("data.city.n_users", self.n_users, 1)
        at_least("data.city.n_pois", self.n_pois, 2)
        at_least("data.city.days", self.days, 1)
        for key in ("explore", "home_am", "home_pm", "day_shift_h", "stop_jitter_h"):
            value = list(getattr(self, key))
            high = 1.0 if key in ("explore", "home_am", "home_pm") else math.inf
            if len(value) != 2 or not 0 <= value[0] <= value[1] <= high:
                raise ConfigError(f"data.city.{key}={value!r} must be a range [low, high] with 0 <= low <= high"
                                  + (" <= 1" if high == 1.0 else ""))
        if not 0 <= self.popularity < math.inf:
            raise ConfigError(f"data.city.popularity={self.popularity!r} must be a finite number >= 0")
        if not 0 < self.checkin_rate <= 1:
            raise ConfigError(f"data.city.checkin_rate={self.checkin_rate!r} must be in (0, 1]")
        if not 0 <= self.shared_routes <= 1:
            raise ConfigError(f"data.city.shared_routes={self.shared_routes!r} must be in [0, 1]")


@dataclass
class LoaderConfig:
    """DataLoader settings of the data module (they never change the data artefacts)."""

    batch_size: int = 8
    num_workers: int = 0


@dataclass
class DataConfig:
    """One dataset: its format, where it lives and how it becomes samples (``data``)."""

    name: str = "synthetic"
    format: str = "synthetic"
    # The folder holding the input files: each option states it (null for the synthetic city); "???"
    # (required) until then, so that a raw dataset without data.root=... fails before any stage runs.
    root: Optional[str] = "???"
    download: bool = False
    # datamodules/download.py SOURCES entry that data.download=true fetches.
    source: Optional[str] = None
    # The raw file inside root (TSMC2014, Gowalla); the release is a folder of files.
    file: Optional[str] = None
    timezone: Optional[str] = None
    # [min_lat, min_lon, max_lat, max_lon] (Gowalla); null keeps the whole world.
    bbox: Optional[tuple[float, float, float, float]] = None
    # Optional CSV location_id,category[,parent_category] (Gowalla ships none).
    categories: Optional[str] = None
    # auto (UTF-8, or Latin-1 when the whole file is) or a declared codec (datamodules/readers/lines.py).
    encoding: str = "auto"
    drop_duplicates: bool = False
    # Share of malformed rows per file tolerated (quarantined) before the run stops.
    max_bad_fraction: float = 0.01
    profiles: str = "generate"
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    descriptions: DescriptionConfig = field(default_factory=DescriptionConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    city: CityConfig = field(default_factory=CityConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        one_of("data.format", self.format, FORMATS)
        one_of("data.profiles", self.profiles, PROFILE_SOURCES)
        at_least("data.max_bad_fraction", self.max_bad_fraction, 0.0)
