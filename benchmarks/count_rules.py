"""How far simple count rules go on next-location cases: the ceiling a model of the same information has
to clear, and the figures the visit-hint weights were picked by.

Every rule scores a candidate place ``c`` for a case of user ``u`` at hour ``t`` from ``u``'s train visits
only, with :func:`datamodules.visit_hints.hint_scores` (the scores the visit hints of
``data.samples.visit_hints`` rank by, so a rule here is the hint a model would read):

* ``hours=h``: visits to ``c`` within ±h hours of ``t`` (circular day), ties by the smaller location id;
* ``user w``: plus w x all of ``u``'s visits to ``c`` (``data.samples.visit_hint_user_weight``);
* ``day w``: window visits on the case's day type (weekday / weekend) count w x (``visit_hint_day_weight``);
* ``moves w``: plus w x ``u``'s train moves from the case's last visit to ``c`` (``visit_hint_moves_weight``).

Acc@1 and NDCG@5 of each rule's ranking. Two kinds of cases:

* ``--split valid`` (no run folder): every visit of the valid split after its trajectory's first
  ``--min-history`` visits. The hint weights of ``cpu_switch=visit_hint_weights`` were picked here.
* a run folder: that run's own next-location *test* cases, with ``user_time``'s (tuned on valid) beside
  them. Reading the test cases makes this an analysis that bounds what count rules can give; nothing
  is picked from it.

    .venv/bin/python benchmarks/count_rules.py artifacts/nyc/data-* --split valid
    .venv/bin/python benchmarks/count_rules.py artifacts/synthetic/data-* artifacts/synthetic/quickstart
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.visit_hints import KEY, hint_scores, top_places  # noqa: E402

CASE = ["traj_id", "target_pos"]
GRID = [(h, u, d) for h in (1, 2, 3) for u in (0.0, 0.1) for d in (1.0, 3.0)]


def checkins(data: Path) -> pl.DataFrame:
    """The data stage's check-ins with each visit's position in its trajectory and the visit before it."""
    return (
        pl.read_parquet(data / "checkins.parquet")
        .sort(KEY)
        .with_columns(pos=pl.int_range(pl.len()).over("traj_id"), last=pl.col("loc_id").shift(1).over("traj_id"))
    )


def cases_of(data: Path, run: Path | None = None, split: str = "valid", min_history: int = 1) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The cases (``traj_id, target_pos, target_loc, user_id, utc_time, local_time, last``, with ``run``
    also its ``user_time`` first guess) and the check-ins whose train visits the rules count."""
    visits = checkins(data)
    at = visits.select("traj_id", "user_id", "utc_time", "local_time", "last", target_pos="pos")
    if run is None:
        cases = visits.filter((pl.col("split") == split) & (pl.col("pos") >= min_history)).select(
            "traj_id", "user_id", "utc_time", "local_time", "last", target_pos="pos", target_loc="loc_id")
    else:
        ranked = pl.read_parquet(run / "rankings.parquet")
        if "task" in ranked.columns:
            ranked = ranked.filter(pl.col("task") == "next")
        cases = ranked.select(*CASE, "target_loc", user_time=pl.col("user_time").list.first()).join(at, on=CASE)
    return cases, visits


def ranking(cases: pl.DataFrame, visits: pl.DataFrame, hours: int, user_weight: float = 0.0, day_weight: float = 1.0,
            moves: float = 0.0, k: int = 10) -> pl.DataFrame:
    """``traj_id, target_pos, target_loc, ranked``: each case's top-``k`` places under one rule."""
    scores = hint_scores(visits, hours, cases, user_weight, day_weight, moves)
    top = top_places(scores, k).group_by(KEY, maintain_order=True).agg(ranked="loc_id")
    return cases.join(top, on=KEY, how="left").select(*CASE, "target_loc", pl.col("ranked").fill_null([]))


def acc_ndcg(ranked: pl.DataFrame, column: str = "ranked") -> tuple[float, float]:
    """Acc@1 and NDCG@5 of the lists in ``column`` against ``target_loc`` (a single relevant place)."""
    acc = ndcg = 0.0
    for places, target in zip(ranked[column].to_list(), ranked["target_loc"].to_list()):
        top = list(places or [])[:5]
        acc += bool(top) and top[0] == target
        ndcg += 1 / math.log2(top.index(target) + 2) if target in top else 0.0
    n = max(ranked.height, 1)
    return acc / n, ndcg / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the data stage's folder (checkins.parquet)")
    ap.add_argument("run", type=Path, nargs="?", help="a run folder whose rankings.parquet holds its next-location test cases")
    ap.add_argument("--split", default="valid", help="without a run: the split whose visits are the cases")
    ap.add_argument("--min-history", type=int, default=1, help="without a run: visits before the first case of a trajectory")
    args = ap.parse_args()
    cases, visits = cases_of(args.data, args.run, args.split, args.min_history)
    where = f"{args.run}: {cases.height} next-location test cases" if args.run else f"{args.split} split: {cases.height} cases"
    print(where)
    if args.run:
        print(f"user_time (tuned on valid) Acc@1 {float((cases['user_time'] == cases['target_loc']).mean()):.3f}")
    print("\n| rule | Acc@1 | NDCG@5 |\n|---|---|---|")
    for hours, user, day in GRID:
        acc, ndcg = acc_ndcg(ranking(cases, visits, hours, user, day))
        print(f"| hours={hours} user={user:g} day={day:g} | {acc:.3f} | {ndcg:.3f} |")
    for hours in (2, 3):
        for w in (0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 12.0, 16.0):
            acc, ndcg = acc_ndcg(ranking(cases, visits, hours, 0.1, 3.0, moves=w))
            print(f"| hours={hours} user=0.1 day=3 moves={w:g} | {acc:.3f} | {ndcg:.3f} |")


if __name__ == "__main__":
    main()
