"""How NYC-like the synthetic city is: the statistics the issue-16 calibration matches, side by side.

For the NYC release and for the synthetic city (as configured, plus any ``--city key=value``
overrides of ``data.city``) this prints, on the test split's next-location cases: visits per
trajectory, the share of targets the user visited in train (revisit share), the share already in the
current trajectory, and the Acc@1 of the count baselines (most_popular, markov, user_most_frequent),
user_time and (with ``--gru``) the GRU, computed by the suite's own test-stage code. Calibration moves only the
generator's knobs until the three count baselines' and user_time's Acc@1 (with ``--gru-rule``, the GRU's too)
are within +-0.05 of NYC's and the other statistics come as near as they can; the model's results are never
looked at.

    .venv/bin/python benchmarks/calibrate_city.py [--city explore=0.3,0.6 ...] [--no-nyc] [--gru]
    .venv/bin/python benchmarks/calibrate_city.py --search 100 --out /tmp/drawn.txt [--gru]   # random cities, one seed
    .venv/bin/python benchmarks/calibrate_city.py --candidates benchmarks/city_candidates.txt [--seeds 42 1 2] [--gru]
    .venv/bin/python benchmarks/calibrate_city.py --search 36 --out /tmp/drawn.txt --gru-rule   # the GRU in the rule

``--search N`` draws N cities over :data:`SEARCH`'s ranges (near the quick start's city, whose ``day_shift_h``
width and ``shared_routes`` lie outside them; ~2 s each on 2 cores, ~13 s with the GRU), scores each at the first
``--seeds`` seed and writes the best, ranked by the rule, as candidate lines to ``--out`` (each line's figures
after a ``#``); ``--candidates`` then scores such lines at every seed and ranks them by the rule again. ``--gru`` adds
the GRU's Acc@1 to both tables (a statistic, not part of the rule); ``--gru-rule`` makes it part of the rule and of
the distance (the quick start's city since session 43 was picked so).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINES = ("most_popular", "markov", "user_most_frequent", "user_time")


def city_stats(overrides: list[str], artifacts: Path | None = None, gru: bool = False) -> dict[str, float]:
    """The statistics of one dataset config (``overrides``), built under ``artifacts`` (default: a new
    temporary folder); with ``gru``, the GRU baseline's Acc@1 too (its valid-tuned grid, ~10 s here)."""
    import numpy as np
    import polars as pl

    from pipeline.paths import data_dir
    from lightning_modules.baselines import eval_cases
    from pipeline.test import test_index
    from run import run
    from tests.conftest import compose_run

    cfg = compose_run([*overrides, f"paths.artifacts={artifacts or tempfile.mkdtemp()}", "eval.max_cases=null", "eval.tasks=[next]",
                       "stage=baselines"])
    results = run(cfg)["baselines"]  # the data stage first, then the baselines
    checkins = pl.read_parquet(data_dir(cfg) / "checkins.parquet")
    cases = eval_cases(test_index(cfg), checkins)
    train = checkins.filter(pl.col("split") == "train")
    seen = train.select("user_id", "loc_id").unique().with_columns(seen=pl.lit(True))
    test_cases = cases.join(seen, left_on=["user_id", "target_loc"], right_on=["user_id", "loc_id"], how="left")
    trajs = checkins.group_by("traj_id").len()
    in_traj = cases.select(pl.col("context").list.contains(pl.col("target_loc")).alias("x"))
    stats = {
        "users": checkins["user_id"].n_unique(), "places": checkins["loc_id"].n_unique(), "check-ins": checkins.height,
        "test cases": cases.height,
        "visits per trajectory": round(float(trajs["len"].mean()), 2),
        "revisit share (target in the user's train places)": round(float(test_cases["seen"].fill_null(False).mean()), 3),
        "target in the current trajectory": round(float(in_traj["x"].mean()), 3),
    }
    for name in BASELINES:
        stats[f"{name} Acc@1"] = round(float(results["metrics"][name]["next"]["acc@1"]), 4)
    if gru:
        from lightning_modules.results import score_by_task
        from pipeline.test import baseline_rankings

        loc_ids = np.sort(checkins["loc_id"].unique().to_numpy())
        rankings, _, _ = baseline_rankings(cfg, cases, checkins, loc_ids, with_gru=True)
        stats["gru Acc@1"] = round(float(score_by_task(rankings["gru"], cases, int(cfg.eval.top_k))["next"]["acc@1"]), 4)
    return stats


# The NYC release's statistics (every next-location test case; README and benchmarks/README.md) that a
# candidate city is scored against, and the rule a pick must meet: each of these baselines within +-0.05 of
# NYC's Acc@1, at every seed scored and on their mean.
NYC = {"visits per trajectory": 5.89, "revisit share (target in the user's train places)": 0.564,
       "target in the current trajectory": 0.272, "most_popular Acc@1": 0.0107, "markov Acc@1": 0.1138,
       "user_most_frequent Acc@1": 0.1868, "user_time Acc@1": 0.2191}
RULE = tuple(f"{name} Acc@1" for name in BASELINES)
TOLERANCE = 0.05
# The GRU's Acc@1 on NYC (over the nyc_qlora_cpu run's 1,000 seeded cases: its grid takes minutes on all 2,698),
# shown beside a candidate's with --gru, and part of the rule with --gru-rule: session 41 found no city that
# brought it to NYC's with the four baselines still within the rule; session 43 found one at the quick start's
# seed and on the three-seed mean (not at every seed), with sparse check-ins (checkin_rate) and moves that
# strangers share (shared_routes) (benchmarks/README.md, "The synthetic city").
NYC_GRU = {"gru Acc@1": 0.181}

# Where --search draws a city: knob -> a fixed value, a tuple of choices, or ((low range), (width range)) for a
# [low, low + width] setting (fixed sizes keep the quick start's cost). A drawn range is capped at CAP's value, and
# the stop jitter is left off (0, 0) in JITTER_OFF of the draws.
SEARCH = {
    "n_users": 100, "days": 72, "checkin_rate": (0.4, 0.5, 0.6, 0.7, 1.0), "n_pois": (300, 400, 500),
    "explore": ((0.35, 0.8), (0.1, 0.3)), "home_am": ((0.05, 0.3), (0.1, 0.1)), "home_pm": ((0.03, 0.2), (0.1, 0.1)),
    "day_shift_h": ((1.0, 5.0), (0.0, 5.0)), "stop_jitter_h": ((0.2, 1.5), (0.2, 2.0)), "popularity": (0.5, 1.0, 1.5, 2.0),
    "shared_routes": (0.0, 0.3, 0.6, 0.9),
}
CAP = {"explore": 0.98}
JITTER_OFF = 2 / 3
# A drawn checkin_rate q keeps about q of the stops, so the city runs round(days / q) days instead of SEARCH's
# days: the same check-ins per user (NYC's ~63), fewer of each day's stops.


def scaled_days(days: int, checkin_rate: float) -> int:
    """The days a city with ``checkin_rate`` runs to keep the check-ins of ``days`` at rate 1."""
    return round(days / checkin_rate)


def city_overrides(settings: list[str]) -> list[str]:
    """``key=value`` / ``key=low,high`` settings of ``data.city`` as Hydra overrides."""
    return [f"data.city.{kv.split('=', 1)[0]}=[{kv.split('=', 1)[1]}]" if "," in kv else f"data.city.{kv}" for kv in settings]


def nyc_figures(gru: bool = False) -> dict[str, float]:
    """NYC's statistics a city is compared with: :data:`NYC`, with ``gru`` the GRU's Acc@1 too."""
    return {**NYC, **(NYC_GRU if gru else {})}


def rule_keys(gru_rule: bool = False) -> tuple[str, ...]:
    """The Acc@1 figures the calibration rule checks: :data:`RULE`, with ``gru_rule`` the GRU's too."""
    return (*RULE, *(NYC_GRU if gru_rule else ()))


def distance(stats: dict[str, float], gru_rule: bool = False) -> float:
    """Summed distance to NYC's seven statistics (visits per trajectory divided by 10), with ``gru_rule`` the
    GRU's Acc@1 as an eighth."""
    return sum(abs(stats[k] - v) / (10 if k.startswith("visits") else 1) for k, v in nyc_figures(gru_rule).items())


def meets(*stats: dict[str, float], gru_rule: bool = False) -> bool:
    """Whether every baseline of :data:`RULE` (with ``gru_rule``, the GRU too) is within :data:`TOLERANCE` of
    NYC's Acc@1 in each of ``stats``."""
    target = nyc_figures(gru_rule)
    return all(abs(s[k] - target[k]) <= TOLERANCE + 1e-9 for s in stats for k in rule_keys(gru_rule))


def draw_city(rng) -> str:
    """One random candidate city (a line of ``key=value`` settings) from :data:`SEARCH`, :data:`CAP` and
    :data:`JITTER_OFF`, drawn with ``rng`` (a :class:`random.Random`)."""
    parts, rate = [], rng.choice(SEARCH["checkin_rate"])  # first: the days depend on it
    for key, how in SEARCH.items():
        if key == "days":
            parts.append(f"days={scaled_days(how, rate)}")
        elif key == "checkin_rate":
            parts.append(f"checkin_rate={rate}")
        elif isinstance(how, (int, float)):
            parts.append(f"{key}={how}")
        elif isinstance(how[0], (int, float)):
            parts.append(f"{key}={rng.choice(how)}")
        else:
            low = rng.uniform(*how[0])
            if key == "stop_jitter_h" and rng.random() < JITTER_OFF:
                low, high = 0.0, 0.0
            else:
                high = min(low + rng.uniform(*how[1]), CAP.get(key, math.inf))
            parts.append(f"{key}={round(low, 2)},{round(high, 2)}")
    return " ".join(parts)


def score_candidates(lines: list[str], experiment: str, seeds: list[int], gru: bool = False,
                     gru_rule: bool = False) -> list[dict]:
    """Each candidate (one line of ``key=value`` city settings) at every seed: its mean statistics, its
    distance to NYC and whether it meets :data:`RULE` at every seed and on the mean; best first. With ``gru``
    the mean holds the GRU's Acc@1 too (not part of the rule or the distance); with ``gru_rule`` (implies
    ``gru``) the GRU is part of both."""
    gru = gru or gru_rule
    rows = []
    for line in lines:
        per_seed = [city_stats([f"experiment={experiment}", f"seed={seed}", *city_overrides(line.split())], gru=gru)
                    for seed in seeds]
        mean = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in nyc_figures(gru)}
        rows.append({"city": line, "mean": mean, "distance": distance(mean, gru_rule),
                     "meets": meets(*per_seed, mean, gru_rule=gru_rule), "per_seed": dict(zip(seeds, per_seed))})
    return sorted(rows, key=lambda r: (not r["meets"], r["distance"]))


def print_ranked(rows: list[dict], seeds: list[int], gru: bool = False, gru_rule: bool = False,
                 per_seed: bool = False) -> None:
    """The table of :func:`score_candidates`' rows, NYC's figures first (with ``gru``, the GRU's column too;
    with ``gru_rule`` the GRU is named in the rule; with ``per_seed`` each seed's figures below the mean's)."""
    nyc = nyc_figures(gru or gru_rule)
    names = [k.replace(" (target in the user's train places)", "").replace(" Acc@1", "") for k in nyc]
    print(f"mean over seeds {seeds}; meets: {', '.join(r.replace(' Acc@1', '') for r in rule_keys(gru_rule))} within +-{TOLERANCE} of "
          "NYC at every seed and on the mean\n")
    print("| city | meets | distance | " + " | ".join(names) + " |\n|---|---|---|" + "---|" * len(names))
    print("| NYC release | | | " + " | ".join(f"{v:.4g}" for v in nyc.values()) + " |")
    for r in rows:
        print(f"| {r['city']} | {'yes' if r['meets'] else 'no'} | {r['distance']:.3f} | "
              + " | ".join(f"{r['mean'][k]:.4g}" for k in nyc) + " |")
        for seed, stats in (r["per_seed"].items() if per_seed else ()):
            print(f"| seed {seed} | | | " + " | ".join(f"{stats[k]:.4g}" for k in nyc) + " |")


def main() -> None:
    import random

    from tests.conftest import NYC_RELEASE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--city", nargs="*", default=[], help="data.city overrides, e.g. explore=0.3,0.6")
    ap.add_argument("--experiment", default="quickstart")
    ap.add_argument("--no-nyc", action="store_true")
    ap.add_argument("--gru", action="store_true", help="the GRU baseline too (the city only: on NYC's 2,698 cases it takes "
                    "minutes); with --search / --candidates a column of their tables, not part of the rule")
    ap.add_argument("--gru-rule", action="store_true", help="the GRU joins the rule and the distance (implies --gru): "
                    "its Acc@1 within +-0.05 of NYC's too")
    ap.add_argument("--per-seed", action="store_true", help="with --candidates: each seed's figures below the mean's")
    ap.add_argument("--candidates", type=Path,
                    help="score every line of this file (city settings as for --city) over --seeds and rank them by the "
                         "calibration rule, instead of printing one city's statistics")
    ap.add_argument("--search", type=int, metavar="N", help="draw N random cities (SEARCH), score each at the first "
                    "--seeds seed, print them ranked and write the --keep best to --out as candidate lines")
    ap.add_argument("--search-seed", type=int, default=0, help="seed of the draws")
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--out", type=Path, help="with --search: the candidates file to write")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    args = ap.parse_args()
    if args.search is not None and args.candidates:
        ap.error("--search and --candidates are two steps: draw with --search --out F, then score F with --candidates F")
    if args.city and (args.search is not None or args.candidates):
        ap.error("--city sets one city; --search draws cities and --candidates reads them from a file")
    if args.out is not None and args.search is None:
        ap.error("--out is the file --search writes")
    if args.per_seed and not args.candidates:
        ap.error("--per-seed shows each seed of --candidates (--search scores one seed)")
    if args.search is not None:
        if args.search < 1 or args.keep < 1:
            ap.error("--search and --keep need at least 1")
        if args.out is None or not args.out.parent.is_dir():
            ap.error("--search needs --out, a file in an existing folder (written after the scoring)")
        rng = random.Random(args.search_seed)
        rows = score_candidates([draw_city(rng) for _ in range(args.search)], args.experiment, args.seeds[:1], args.gru,
                                args.gru_rule)
        print_ranked(rows, args.seeds[:1], args.gru, args.gru_rule)
        kept = rows[: args.keep]
        figures = [k for k in rows[0]["mean"] if k.endswith("Acc@1")]
        args.out.write_text(
            f"# calibrate_city.py --search {args.search} --search-seed {args.search_seed}: the {len(kept)} best at seed "
            f"{args.seeds[0]}, best first; after each '#': meets the rule, distance, Acc@1 of {', '.join(figures)}\n"
            + "".join(f"{r['city']}  # {'yes' if r['meets'] else 'no'} {r['distance']:.3f} "
                      + " ".join(f"{r['mean'][k]:.3f}" for k in figures) + "\n" for r in kept))
        return
    if args.candidates:
        lines = [ln.split("#")[0].strip() for ln in args.candidates.read_text().splitlines()]
        rows = score_candidates([ln for ln in lines if ln], args.experiment, args.seeds, args.gru, args.gru_rule)
        print_ranked(rows, args.seeds, args.gru, args.gru_rule, args.per_seed)
        return
    columns = {}
    if not args.no_nyc:
        columns["NYC release"] = city_stats(["experiment=nyc_qlora_cpu", f"data.root={NYC_RELEASE}"])
    columns["synthetic"] = city_stats([f"experiment={args.experiment}", *city_overrides(args.city)], gru=args.gru)
    names = list(columns)
    print("| statistic | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in columns[names[-1]]:
        print(f"| {key} | " + " | ".join(str(columns[n].get(key, "")) for n in names) + " |")


if __name__ == "__main__":
    main()
