"""How far simple count rules go on a run's next-location test cases: the ceiling a model of the same
information has to clear.

``user_time`` (lightning_modules/user_time.py) is tuned on the valid split; this script asks whether a
nearby count rule would do clearly better on the *test* cases, i.e. whether there is information in the
user's train visits that ``user_time`` leaves on the table for a model to find. Every rule scores a
candidate place ``c`` for a case of user ``u`` whose target is at hour ``t`` from ``u``'s train visits only:

* ``hours=h``: visits to ``c`` within ±h hours of ``t`` (circular day), ties by the smaller location id;
* ``+ user``: plus 0.1 x all of ``u``'s visits to ``c`` (ties and empty windows resolved by overall habit);
* ``+ day type``: visits on the target's day type (weekday / weekend) count 3x;
* ``+ transitions w``: plus ``w`` x ``u``'s train moves from the case's last visit to ``c``.

The first guess is compared with the target; ``user_time``'s own first guess (the run's rankings) is
printed beside it. Reading the test cases is what makes this an *analysis*, not a model: nothing here is
picked for a run, and the figures only bound what count information can give.

    .venv/bin/python benchmarks/count_rules.py artifacts/synthetic/data-* artifacts/synthetic/quickstart
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl


def cases_of(data: Path, run: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The run's next-location test cases (user, target hour and day type, last visit) and the train visits."""
    visits = (
        pl.read_parquet(data / "checkins.parquet")
        .sort(["traj_id", "utc_time"])
        .with_columns(
            pos=pl.int_range(pl.len()).over("traj_id"),
            hour=pl.col("local_time").dt.hour().cast(pl.Int32),
            weekend=pl.col("local_time").dt.weekday() >= 6,
            last=pl.col("loc_id").shift(1).over("traj_id"),
        )
    )
    ranked = pl.read_parquet(run / "rankings.parquet")
    cases = ranked.select("traj_id", "target_pos", "target_loc", user_time=pl.col("user_time").list.first()).join(
        visits.select("traj_id", "user_id", "hour", "weekend", "last", target_pos="pos"), on=["traj_id", "target_pos"]
    )
    return cases, visits.filter(pl.col("split") == "train")


def acc_at_1(cases: pl.DataFrame, train: pl.DataFrame, hours: int, w_user: float = 0.0, day_type: bool = False,
             w_trans: float = 0.0) -> float:
    """Acc@1 of one count rule (module docstring) over ``cases``."""
    gap = (pl.col("hour") - pl.col("visit_hour")).abs()
    gap = pl.min_horizontal(gap, 24 - gap)
    weight = pl.when(pl.col("weekend") == pl.col("visit_weekend")).then(3.0).otherwise(1.0) if day_type else pl.lit(1.0)
    per_place = (
        cases.join(train.select("user_id", "loc_id", visit_hour="hour", visit_weekend="weekend"), on="user_id")
        .group_by("traj_id", "target_pos", "loc_id")
        .agg(window=((gap <= hours).cast(pl.Float64) * weight).sum(), user=pl.len().cast(pl.Float64))
    )
    moves = train.filter(pl.col("last").is_not_null()).group_by("user_id", "last", "loc_id").agg(moves=pl.len())
    scored = (
        per_place.join(cases.select("traj_id", "target_pos", "user_id", "last"), on=["traj_id", "target_pos"])
        .join(moves, on=["user_id", "last", "loc_id"], how="left")
        .with_columns(score=pl.col("window") + w_user * pl.col("user") + w_trans * pl.col("moves").fill_null(0))
        .filter(pl.col("score") > 0)
    )
    first = scored.sort(["score", "loc_id"], descending=[True, False]).group_by("traj_id", "target_pos").first()
    guessed = cases.join(first.select("traj_id", "target_pos", guess="loc_id"), on=["traj_id", "target_pos"], how="left")
    return float((guessed["guess"] == guessed["target_loc"]).fill_null(False).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the data stage's folder (checkins.parquet)")
    ap.add_argument("run", type=Path, help="a run folder whose rankings.parquet holds the next-location test cases")
    args = ap.parse_args()
    cases, train = cases_of(args.data, args.run)
    ut = float((cases["user_time"] == cases["target_loc"]).mean())
    print(f"{args.run}: {cases.height} next-location test cases; user_time (tuned on valid) Acc@1 {ut:.3f}\n")
    print("| rule | Acc@1 |\n|---|---|")
    for hours in (1, 2, 3):
        print(f"| hours={hours} | {acc_at_1(cases, train, hours):.3f} |")
        print(f"| hours={hours} + user | {acc_at_1(cases, train, hours, w_user=0.1):.3f} |")
        print(f"| hours={hours} + user + day type | {acc_at_1(cases, train, hours, w_user=0.1, day_type=True):.3f} |")
    for w in (0.5, 1.0, 2.0):
        print(f"| hours=2 + user + transitions {w:g} | {acc_at_1(cases, train, 2, w_user=0.1, w_trans=w):.3f} |")


if __name__ == "__main__":
    main()
