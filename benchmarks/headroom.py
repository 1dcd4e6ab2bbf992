"""How much room is there above ``user_time`` for a model that reads the same counts and the trajectory?

``user_time`` hand-weights three terms (hour window, all visits, the current trajectory). This probe *fits*
a ranker to the valid split instead, over a richer set of the same kind of evidence, and scores it on a
run's own test cases beside ``user_time`` (paired bootstrap of the difference). It bounds what the visit
hints plus the trajectory can give a model of a city, not what an LLM will learn from them:

* ``window``: per candidate place, the user's train visits at each circular hour distance 0, 1, 2, 3 and
  4-6 from the case's hour, on the case's day type (weekday / weekend) and on the other;
* ``user``: the user's train visits to it at any hour;
* ``trajectory``: whether it is the 1st, 2nd, 3rd most recent visit of the case's context, and how many
  context visits it has further back;
* ``moves``: the user's train moves, and everyone's, from the case's last visit to it;
* ``popularity``: everyone's train visits to it.

Each count enters as ``log1p`` and as an indicator. Candidates: the user's 200 most visited train places and
the context's places (a target outside them is a miss for the ranker, as for ``user_time``'s own list).
Two scorers are fitted on the valid cases (every valid visit after its trajectory's first, the split
``user_time`` is tuned on): a conditional logit (a linear score, softmax over a case's candidates) and a
small MLP (two layers of 32) per candidate. Feature groups are dropped one at a time, and the window is
coarsened (day types merged; one ±2 h count per day type) to show which carry the gain; test cases are
never fitted on. With a run folder of a model with visit hints, the run's own hint rule (its top 10 by the
hint scores, with the window and weights of its ``config.yaml``: ``benchmarks/count_rules.py``'s ``ranking``)
is a row too, and the model's paired difference from it: how much the model adds to the hints it reads.
CPU seconds on the synthetic city, a minute or two on NYC.

    .venv/bin/python benchmarks/headroom.py <data folder> <run folder>
    # e.g. the quick start: artifacts/synthetic/data-* artifacts/synthetic/quickstart
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_modules.metrics import paired_bootstrap, per_case  # noqa: E402

CASE = ["traj_id", "target_pos"]
MAX_CANDIDATES = 200
RECENT = 3  # context positions with a feature of their own
GROUPS = {
    "window": [f"w{d}_{s}" for d in range(4) for s in ("same", "other")] + ["w4to6_same", "w4to6_other"],
    "user": ["user"],
    "trajectory": [f"recent{k}" for k in range(1, RECENT + 1)] + ["earlier"],
    "moves": ["user_moves", "all_moves"],
    "popularity": ["pop"],
}


def visits_of(data: Path) -> pl.DataFrame:
    """Check-ins in trajectory order with position, hour of day and day type."""
    return (
        pl.read_parquet(data / "checkins.parquet", columns=["traj_id", "user_id", "utc_time", "local_time", "loc_id", "split"])
        .sort("traj_id", "utc_time", maintain_order=True)
        .with_columns(pos=pl.int_range(pl.len()).over("traj_id").cast(pl.Int32),
                      hour=pl.col("local_time").dt.hour().cast(pl.Int32),
                      weekend=pl.col("local_time").dt.weekday() >= 6)
    )


def cases_from(visits: pl.DataFrame, keys: pl.DataFrame) -> pl.DataFrame:
    """``traj_id, target_pos, target_loc, user_id, hour, weekend, last, context`` (most recent first, up to 10)."""
    v = visits.select("traj_id", "pos", "loc_id")
    context = (
        keys.select(CASE).with_columns(pos=pl.int_ranges(pl.max_horizontal(pl.col("target_pos") - 10, 0), "target_pos", dtype=pl.Int32))
        .explode("pos").filter(pl.col("pos").is_not_null())
        .join(v, on=["traj_id", "pos"]).sort(*CASE, "pos", descending=[False, False, True])
        .group_by(CASE, maintain_order=True).agg(context=pl.col("loc_id"))
    )
    target = visits.select("traj_id", target_pos="pos", target_loc="loc_id", user_id="user_id", hour="hour", weekend="weekend")
    return (keys.select(CASE).join(target, on=CASE, how="left", maintain_order="left")
            .join(context, on=CASE, how="left", maintain_order="left")
            .with_columns(pl.col("context").fill_null([])).with_columns(last=pl.col("context").list.first()))


def features(cases: pl.DataFrame, visits: pl.DataFrame) -> tuple[pl.DataFrame, list[str]]:
    """One row per (case, candidate) with every feature of :data:`GROUPS`, and the feature names."""
    train = visits.filter(pl.col("split") == "train")
    case = cases.with_row_index("case")
    per_user = train.group_by("user_id", "loc_id").agg(user=pl.len())
    top = per_user.sort(["user", "loc_id"], descending=[True, False]).group_by("user_id", maintain_order=True).head(MAX_CANDIDATES)
    from_user = case.select("case", "user_id").join(top.select("user_id", "loc_id"), on="user_id")
    from_context = case.select("case", loc_id="context").explode("loc_id").filter(pl.col("loc_id").is_not_null())
    cand = pl.concat([from_user.select("case", "loc_id"), from_context]).unique(maintain_order=True)
    rows = cand.join(case.select("case", "user_id", "hour", "weekend", "last", "context", "target_loc"), on="case")

    hist = train.group_by("user_id", "loc_id", "hour", "weekend").agg(n=pl.len())
    dist = (pl.col("hour") - pl.col("hour_right")).abs()
    window = (
        rows.select("case", "loc_id", "user_id", "hour", "weekend").join(hist, on=["user_id", "loc_id"])
        .with_columns(d=pl.min_horizontal(dist, 24 - dist), same=pl.col("weekend") == pl.col("weekend_right"))
        .filter(pl.col("d") <= 6)
        .with_columns(bucket=pl.when(pl.col("d") <= 3).then(pl.format("w{}", pl.col("d"))).otherwise(pl.lit("w4to6"))
                      + pl.when(pl.col("same")).then(pl.lit("_same")).otherwise(pl.lit("_other")))
        .pivot(on="bucket", index=["case", "loc_id"], values="n", aggregate_function="sum")
    )
    ctx = rows.select("case", "loc_id", "context").with_columns(
        **{f"recent{k}": (pl.col("context").list.get(k - 1, null_on_oob=True) == pl.col("loc_id")).fill_null(False).cast(pl.Float64)
           for k in range(1, RECENT + 1)})
    earlier = (rows.select("case", "loc_id", "context").with_columns(older=pl.col("context").list.slice(RECENT))
               .explode("older").filter(pl.col("older") == pl.col("loc_id")).group_by("case", "loc_id").agg(earlier=pl.len()))
    ctx = ctx.drop("context").join(earlier, on=["case", "loc_id"], how="left")
    moves = train.with_columns(prev=pl.col("loc_id").shift(1).over("traj_id")).filter(pl.col("prev").is_not_null())
    user_moves = moves.group_by("user_id", "prev", "loc_id").agg(user_moves=pl.len())
    all_moves = moves.group_by("prev", "loc_id").agg(all_moves=pl.len())
    pop = train.group_by("loc_id").agg(pop=pl.len())

    names = [n for g in GROUPS.values() for n in g]
    out = (
        rows.select("case", "loc_id", "user_id", "last", "target_loc")
        .join(window, on=["case", "loc_id"], how="left")
        .join(ctx, on=["case", "loc_id"], how="left")
        .join(per_user, on=["user_id", "loc_id"], how="left")
        .join(user_moves.rename({"prev": "last"}), on=["user_id", "last", "loc_id"], how="left")
        .join(all_moves.rename({"prev": "last"}), on=["last", "loc_id"], how="left")
        .join(pop, on="loc_id", how="left")
    )
    out = out.with_columns([(pl.col(n) if n in out.columns else pl.lit(0)).cast(pl.Float64).fill_null(0.0).alias(n) for n in names])
    return out.select("case", "loc_id", "target_loc", *names).sort("case", "loc_id"), names


def coarsen(rows: pl.DataFrame, names: list[str], how: str) -> tuple[pl.DataFrame, list[str]]:
    """The window features coarsened: ``day`` merges the two day types of each hour distance; ``hours`` keeps
    one count within ±2 h per day type (``user_time``'s default window; beyond it nothing)."""
    window = GROUPS["window"]
    if how == "day":
        merged = {f"w{b}": pl.col(f"w{b}_same") + pl.col(f"w{b}_other") for b in ("0", "1", "2", "3", "4to6")}
    else:
        merged = {f"w0to2_{t}": sum((pl.col(f"w{d}_{t}") for d in range(3)), pl.lit(0.0)) for t in ("same", "other")}
    rest = [n for n in names if n not in window]
    return rows.with_columns(**merged).select("case", "loc_id", "target_loc", *merged, *rest), [*merged, *rest]


def tensors(rows: pl.DataFrame, names: list[str], n_cases: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Padded ``(cases, candidates, features)`` inputs (log1p and indicator of each count), the mask, each
    case's target index (-1: not a candidate) and the candidates' location ids."""
    counts = rows.group_by("case", maintain_order=True).len()
    width = int(counts["len"].max())
    slot = rows.select(slot=pl.int_range(pl.len()).over("case"))["slot"].to_numpy()
    ci = rows["case"].to_numpy()
    raw = rows.select(names).to_numpy()
    x = np.zeros((n_cases, width, 2 * len(names)), dtype=np.float32)
    x[ci, slot] = np.concatenate([np.log1p(raw), (raw > 0)], axis=1)
    mask = np.zeros((n_cases, width), dtype=bool)
    mask[ci, slot] = True
    loc = np.full((n_cases, width), -1, dtype=np.int64)
    loc[ci, slot] = rows["loc_id"].to_numpy()
    target = np.full(n_cases, -1, dtype=np.int64)
    hit = rows["loc_id"].to_numpy() == rows["target_loc"].to_numpy()
    target[ci[hit]] = slot[hit]
    return torch.from_numpy(x), torch.from_numpy(mask), torch.from_numpy(target), loc


class Scorer(torch.nn.Module):
    def __init__(self, n: int, hidden: int = 0) -> None:
        super().__init__()
        self.net = (torch.nn.Sequential(torch.nn.Linear(n, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                        torch.nn.GELU(), torch.nn.Linear(hidden, 1)) if hidden else torch.nn.Linear(n, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1).masked_fill(~mask, -1e9)


def fit(x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, hidden: int, seed: int = 0) -> Scorer:
    """Conditional-likelihood fit on the cases whose target is a candidate (full batch, Adam, weight decay)."""
    torch.manual_seed(seed)
    keep = target >= 0
    x, mask, target = x[keep], mask[keep], target[keep]
    model = Scorer(x.shape[-1], hidden)
    opt = torch.optim.Adam(model.parameters(), lr=0.03 if not hidden else 0.01, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x, mask), target)
        loss.backward()
        opt.step()
    return model


def rank(model: Scorer, x: torch.Tensor, mask: torch.Tensor, loc: np.ndarray, k: int = 10) -> np.ndarray:
    """``(cases, k)``: each case's top ``k`` candidates (ties: the smaller location id), -1 past its last."""
    with torch.no_grad():
        s = model(x, mask).numpy()
    out = np.full((len(s), k), -1, dtype=np.int64)
    for i in range(len(s)):
        ok = mask[i].numpy()
        top = loc[i][ok][np.lexsort((loc[i][ok], -s[i][ok]))[:k]]
        out[i, : len(top)] = top
    return out


def padded(lists: pl.Series) -> np.ndarray:
    """A ``rankings.parquet`` column (one list of location ids per case) as a ``(cases, width)`` array, -1 past a list's end."""
    width = max(int(lists.list.len().max() or 0), 1)
    return np.array([(row or []) + [-1] * (width - len(row or [])) for row in lists.to_list()], dtype=np.int64)


def user_time_lists(visits: pl.DataFrame, valid: pl.DataFrame, test: pl.DataFrame) -> np.ndarray:
    """``(cases, 10)``: ``user_time``'s top 10 for the test cases: fitted on the train visits, tuned on the valid cases (as a run does)."""
    from lightning_modules.user_time import UserTimeBaseline, tune_user_time

    def as_cases(c: pl.DataFrame) -> pl.DataFrame:  # user_time reads the context oldest first
        return c.select("user_id", "target_loc", target_hour="hour", context=pl.col("context").list.reverse())

    model = UserTimeBaseline(visits.filter(pl.col("split") == "train"))
    params, _ = tune_user_time(model, as_cases(valid))
    return model.rank(as_cases(test), params)


def run_hint_rule(data: Path, run: Path, test: pl.DataFrame) -> tuple[str, np.ndarray] | None:
    """The ranking the run's visit hints come from (the top 10 by the hint scores, with the run's own hint
    window and weights from its ``config.yaml``; the prompt shows its first ``visit_hints``) for ``test``'s
    cases in their order; None for a run without visit hints."""
    import yaml

    from benchmarks.count_rules import cases_of, ranking

    samples = yaml.safe_load((run / "config.yaml").read_text())["data"]["samples"]
    if not samples.get("visit_hints"):
        return None
    # Runs from before a switch existed lack its key: its neutral value is how they were trained.
    hours = int(samples.get("visit_hint_hours", 1))
    user, day = float(samples.get("visit_hint_user_weight", 0.0)), float(samples.get("visit_hint_day_weight", 1.0))
    moves = float(samples.get("visit_hint_moves_weight", 0.0))
    cases, visits = cases_of(data, run)
    ranked = ranking(cases, visits, hours, user, day, moves)
    lists = test.select(CASE).join(ranked, on=CASE, how="left", maintain_order="left")["ranked"]
    also = f", + {moves:g} × moves" if moves else ""
    return f"the run's hint rule (±{hours} h, day type {day:g}×, + {user:g} × user{also})", padded(lists)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="the data stage's folder (checkins.parquet)")
    ap.add_argument("run", type=Path, nargs="?",
                    help="a run folder whose rankings.parquet holds its next-location test cases and user_time's lists; "
                         "without it: every test visit after its trajectory's first, user_time fitted here")
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()
    visits = visits_of(args.data)
    valid = cases_from(visits, visits.filter((pl.col("split") == "valid") & (pl.col("pos") >= 1)).select("traj_id", target_pos="pos"))
    if args.run:
        ranked = pl.read_parquet(args.run / "rankings.parquet")
        if "task" in ranked.columns:
            ranked = ranked.filter(pl.col("task") == "next")
        ranked = ranked.sort(CASE)
        test = cases_from(visits, ranked.select(CASE))
        assert (test["target_loc"] == ranked["target_loc"]).all(), "the run's test targets are not this data folder's"
        model_col = next((c for c in ranked.columns if c.startswith("QT-Mob") and not c.endswith("scores")), None)
        user_time, where = padded(ranked["user_time"]), f"{test.height} test cases of {args.run.name}"
    else:
        test = cases_from(visits, visits.filter((pl.col("split") == "test") & (pl.col("pos") >= 1)).select("traj_id", target_pos="pos"))
        model_col, user_time, where = None, user_time_lists(visits, valid, test), f"all {test.height} test visits after their trajectory's first"

    fv, names = features(valid, visits)
    ft, _ = features(test, visits)
    covered = fv.filter(pl.col("loc_id") == pl.col("target_loc"))["case"].n_unique() / max(valid.height, 1)
    print(f"{args.data.name}: fitted on {valid.height} valid cases (target a candidate in {covered:.3f}); scored on {where}")
    target = test["target_loc"].to_numpy()
    base = per_case(user_time, target)

    def row(label: str, ranked: np.ndarray) -> dict[str, np.ndarray]:
        values = per_case(ranked, target)
        cells = [f"{values['acc@1'].mean():.3f}", f"{values['ndcg@5'].mean():.3f}"]
        if ranked is not user_time:  # paired differences against user_time on the same cases
            cells += difference(values, base)
        print(f"| {label} | " + " | ".join(cells + [""] * (4 - len(cells))) + " |")
        return values

    def difference(values: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> list[str]:
        """Cells of the paired difference ``values`` − ``other`` (Acc@1, NDCG@5) with its bootstrap interval."""
        d = paired_bootstrap({"a": values, "b": other}, reference="a", resamples=args.resamples, seed=42)["differences"]["b"]
        return [f"{d[m]['diff']:+.3f} ({d[m]['ci'][0]:+.3f} to {d[m]['ci'][1]:+.3f})" for m in ("acc@1", "ndcg@5")]

    def fitted(fit_rows: pl.DataFrame, test_rows: pl.DataFrame, cols: list[str], hidden: int = 0) -> np.ndarray:
        """The test ranking of a scorer fitted on the valid cases over the features ``cols``."""
        xv, mv, tv, _ = tensors(fit_rows, cols, valid.height)
        xt, mt, _, lt = tensors(test_rows, cols, test.height)
        return rank(fit(xv, mv, tv, hidden), xt, mt, lt)

    variants = [("linear, all features", fv, ft, names, 0), ("MLP, all features", fv, ft, names, 32)]
    variants += [(f"linear, without {group}", fv, ft, [n for n in names if n not in cols], 0) for group, cols in GROUPS.items()]
    for how, label in (("day", "window without the day type"), ("hours", "window as one ±2 h count per day type")):
        (cv, coarse), (ct, _) = coarsen(fv, names, how), coarsen(ft, names, how)
        variants.append((f"linear, {label}", cv, ct, coarse, 0))
    print("\n| ranker (test cases) | Acc@1 | NDCG@5 | Δ Acc@1 vs user_time | Δ NDCG@5 vs user_time |\n|---|---|---|---|---|")
    row("user_time (tuned on valid)", user_time)
    if model_col:
        model = row(model_col, padded(ranked[model_col]))
        hints = run_hint_rule(args.data, args.run, test)
        if hints is not None:
            rule = row(*hints)
            print(f"| {model_col} − its hint rule | | | " + " | ".join(difference(model, rule)) + " |")
    for label, fit_rows, test_rows, cols, hidden in variants:
        row(label, fitted(fit_rows, test_rows, cols, hidden))

if __name__ == "__main__":
    main()
