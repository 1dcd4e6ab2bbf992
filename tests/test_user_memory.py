"""User memory in the prompt (data.samples.user_places): the user's top train places as location tokens,
and never a valid or test visit."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from datamodules.config import SampleConfig
from datamodules.rendering import render_samples
from datamodules.samples import build_sample_index
from datamodules.user_memory import user_memory

CODES = pl.DataFrame({"loc_id": [1, 2, 3, 4, 5], "code": ["<a_1>", "<a_2>", "<a_3>", "<a_4>", "<a_5>"]})


def _visits() -> pl.DataFrame:
    """u: office (1) three mornings, home (2) two evenings, once (5) in train; (3) and (4) only in valid/test."""
    t0, rows = datetime(2024, 1, 1), []
    for d, (hour, loc) in enumerate([(9, 1), (9, 1), (10, 1), (20, 2), (20, 2), (13, 5)]):
        rows.append(("u", f"train_{d}", "train", t0 + timedelta(days=d, hours=hour), loc))
        rows.append(("u", f"train_{d}", "train", t0 + timedelta(days=d, hours=hour + 1), 1 if loc != 1 else 2))
    for d in range(6):
        for split, loc in (("valid", 3), ("test", 4)):
            rows += [("u", f"{split}_{d}", split, t0 + timedelta(days=30 + d, hours=h), loc) for h in (8, 9, 10)]
    return pl.DataFrame(rows, schema=["user_id", "traj_id", "split", "local_time", "loc_id"], orient="row").with_columns(
        utc_time=pl.col("local_time").dt.replace_time_zone("UTC"), loc_id=pl.col("loc_id").cast(pl.Int64))


def test_memory_comes_from_train_visits_only() -> None:
    visits = _visits()
    memory = user_memory(visits, CODES, k=3)["memory"].to_list()
    assert len(memory) == 1
    text = memory[0]
    assert text.startswith("User u often visits POI index <a_1> (")
    assert "<a_3>" not in text and "<a_4>" not in text, "a valid or test visit leaked into the prompt"
    counts = dict(visits.filter(pl.col("split") == "train").group_by("loc_id").len().iter_rows())
    for loc in (1, 2):
        assert f"<a_{loc}> ({counts[loc]} visits" in text
    # 09:00 and 21:00 twice each for place 1: the earliest of the most frequent hours.
    assert "<a_1> (6 visits, usually around 09:00)" in text and "<a_5> (1 visit, usually around 13:00)" in text
    assert user_memory(visits, CODES, k=0).is_empty()


def test_memory_follows_the_profile_in_next_and_recovery_prompts() -> None:
    visits = _visits()
    profiles = pl.DataFrame({"user_id": ["u"], "profile": ["likes coffee"]})
    cfg = SampleConfig(user_places=2)
    index = build_sample_index(visits, None, cfg, tasks=("next", "recovery_single"))
    memory = user_memory(visits, CODES, cfg.user_places)
    with_memory = render_samples(index, visits, CODES, None, profiles, cfg, memory)
    without = render_samples(index, visits, CODES, None, profiles, cfg)
    for a, b in zip(with_memory["prompt"].to_list(), without["prompt"].to_list()):
        head = "User u has the following profile: likes coffee\n"
        assert a.startswith(head + memory["memory"][0]) and b.startswith(head)
        assert a == b.replace(head, head + memory["memory"][0], 1)
    assert with_memory["target"].to_list() == without["target"].to_list()
