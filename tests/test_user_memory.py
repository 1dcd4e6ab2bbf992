"""User memory in the prompt (data.samples.user_places): the user's top train places as location tokens,
never a valid or test visit, and never a visit of the sample's own trajectory."""

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
    memory = user_memory(visits, CODES, k=3)
    by_traj = dict(memory.iter_rows())
    # A valid or test trajectory leaves no train visit out: its memory counts all of them.
    text = by_traj["test_0"]
    assert by_traj["valid_0"] == text and set(by_traj) == set(visits["traj_id"].unique())
    assert text.startswith("User u often visits POI index <a_1> (")
    assert "<a_3>" not in text and "<a_4>" not in text, "a valid or test visit leaked into the prompt"
    counts = dict(visits.filter(pl.col("split") == "train").group_by("loc_id").len().iter_rows())
    for loc in (1, 2):
        assert f"<a_{loc}> ({counts[loc]} visits" in text
    # 09:00 and 21:00 twice each for place 1: the earliest of the most frequent hours.
    assert "<a_1> (6 visits, usually around 09:00)" in text and "<a_5> (1 visit, usually around 13:00)" in text
    assert user_memory(visits, CODES, k=0).is_empty()


def test_memory_of_a_train_trajectory_leaves_its_own_visits_out() -> None:
    visits = _visits()
    by_traj = dict(user_memory(visits, CODES, k=3).iter_rows())
    # train_5: (13:00, place 5) then (14:00, place 1). Without it, place 5 has no visit left and place 1 five.
    assert "<a_5>" not in by_traj["train_5"]
    assert "<a_1> (5 visits, usually around 09:00)" in by_traj["train_5"]
    # train_0: (09:00, place 1), (10:00, place 2). Place 1 keeps 5 visits (09, 10, 14, 21, 21: usually 21:00, not
    # the 09:00 it has with train_0), place 2 keeps 4 (10, 11, 20, 20).
    assert "<a_1> (5 visits, usually around 21:00), POI index <a_2> (4 visits, usually around 20:00)" in by_traj["train_0"]
    # The same visits counted directly, per trajectory: its memory never counts a visit of its own.
    train = visits.filter(pl.col("split") == "train")
    for traj, text in by_traj.items():
        others = train.filter(pl.col("traj_id") != traj).group_by("loc_id").len()
        for loc, n in others.iter_rows():
            if f"<a_{loc}> (" in text:
                assert f"<a_{loc}> ({n} visit" in text, (traj, loc)


def test_memory_of_unseen_trajectories_counts_every_train_visit() -> None:
    """stage=predict: check-ins that are not in the history get the memory of all their user's train visits."""
    visits = _visits()
    new = pl.DataFrame({"traj_id": ["new", "other"], "user_id": ["u", "stranger"]})
    memory = user_memory(visits, CODES, k=3, visits=new)
    assert memory["traj_id"].to_list() == ["new"], "a user without train visits gets no memory"
    assert memory["memory"][0] == dict(user_memory(visits, CODES, k=3).iter_rows())["test_0"]


def test_memory_follows_the_profile_in_next_and_recovery_prompts() -> None:
    visits = _visits()
    profiles = pl.DataFrame({"user_id": ["u"], "profile": ["likes coffee"]})
    cfg = SampleConfig(user_places=2)
    index = build_sample_index(visits, None, cfg, tasks=("next", "recovery_single"))
    memory = user_memory(visits, CODES, cfg.user_places)
    by_traj = dict(memory.iter_rows())
    with_memory = render_samples(index, visits, CODES, None, profiles, cfg, memory)
    without = render_samples(index, visits, CODES, None, profiles, cfg)
    assert with_memory.height == without.height > 0
    head = "User u has the following profile: likes coffee\n"
    for traj, a, b in zip(with_memory["traj_id"], with_memory["prompt"], without["prompt"]):
        assert a.startswith(head + by_traj[traj]) and b.startswith(head)
        assert a == b.replace(head, head + by_traj[traj], 1)
    assert with_memory["target"].to_list() == without["target"].to_list()
    # Train trajectories differ in their memory: each leaves its own visits out.
    train = with_memory.filter(pl.col("split") == "train")
    assert train["prompt"].str.extract(r"often visits (.*)\.\n").n_unique() > 1
