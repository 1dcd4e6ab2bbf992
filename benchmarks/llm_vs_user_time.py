"""Does the aligned LLM know anything that ``user_time`` (the strongest count rule) does not?

Ranks seeded valid next-location cases and the run's test cases with the aligned model (as ``stage=test``
does: the same prompts, beam search and precision), then on the same cases:

1. **Who is right where** (Acc@1): both, only the LLM, only ``user_time``; and, where their first guesses
   differ, how often each is right. A small "only the LLM" share bounds what any per-case choice between
   the two can gain.
2. **Where the LLM's first guess comes from**: the visit hint's first/second/third place, another visit
   of the prompt, a place only another visit's hint names, or a place the prompt does not name, with Acc@1
   among each and how often the hint's first place would have been right there (needs
   ``data.samples.visit_hints``).
3. **Calibration**: for the hinted places and the last visit, how often each is the target against the
   model's mean probability of it (by the hint's count too).
4. **The LLM as a reranker** of ``user_time``'s top k: its first beam entry among them.
5. **Fusion picked on the valid split**: the two top-lists merged by weighted reciprocal rank
   (``w / (k + rank_llm) + (1 - w) / (k + rank_user_time)``) and by a log-linear score
   (beam log-probability + ``λ · log(ε + user_time score)``) over a small grid; the best point on the
   valid cases ranks the test cases, compared with ``user_time`` and the LLM alone with paired intervals.
   If the best fusion is no better than ``user_time`` alone, the LLM's ranking adds nothing the counts
   lack.

Give the overrides of a run whose alignment is finished (the same ones, with the same ``QTMOB_ARTIFACTS``):

    .venv/bin/python benchmarks/llm_vs_user_time.py experiment=nyc_qlora_cpu data.root=<NYC release> [--valid-cases 1000]

The LLM's rankings are kept in ``<run>/llm_vs_user_time/`` under the run's test fingerprint and reused by
a later call (beam search is ~0.5 s per case on 2 cores); the report is printed and written there
(``report.md``, ``report.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RRF_GRID = [("rrf", w, k) for w, k in itertools.product((0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8), (0, 1, 3, 10, 60))]
LOGLIN_GRID = [("loglin", lam, eps) for lam, eps in itertools.product((0.25, 0.5, 1, 2, 3, 5), (0.1, 0.5, 1, 3))]


def fuse(llm_locs: np.ndarray, llm_scores: np.ndarray, ut_cand: np.ndarray, ut_score: np.ndarray,
         point: tuple[str, float, float], size: int = 10, ut_top: int = 30) -> np.ndarray:
    """``(n, size)`` fused rankings over the union of the LLM's beam and ``user_time``'s ``ut_top`` best."""
    kind, a, b = point
    out = np.full((len(llm_locs), size), -1, dtype=np.int64)
    for i in range(len(llm_locs)):
        llm = [(int(c), float(s)) for c, s in zip(llm_locs[i], llm_scores[i]) if c >= 0]
        order = np.argsort(-ut_score[i], kind="stable")
        ut = [(int(ut_cand[i, j]), float(ut_score[i, j])) for j in order[:ut_top] if np.isfinite(ut_score[i, j])]
        llm_rank = {c: r for r, (c, _) in enumerate(llm)}
        ut_rank = {c: r for r, (c, _) in enumerate(ut)}
        llm_lp, ut_s = dict(llm), dict(ut)
        floor = min(llm_lp.values()) - 1.0 if llm_lp else 0.0  # outside the beam: below its last place
        fused = {}
        for c in dict.fromkeys([c for c, _ in llm] + [c for c, _ in ut]):
            if kind == "rrf":
                fused[c] = (a / (b + llm_rank[c] + 1) if c in llm_rank else 0.0) + \
                           ((1 - a) / (b + ut_rank[c] + 1) if c in ut_rank else 0.0)
            else:
                fused[c] = llm_lp.get(c, floor) + a * np.log(b + ut_s.get(c, 0.0))
        best = sorted(fused, key=lambda c: -fused[c])[:size]
        out[i, : len(best)] = best
    return out


def hits(ranked: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-case Acc@1 and NDCG@5 (of the top 10, as the results tables)."""
    from lightning_modules.metrics import per_case

    return {m: v for m, v in per_case(np.asarray(ranked)[:, :10], target).items() if m in ("acc@1", "ndcg@5")}


def _hint_tokens(text: str | None) -> list[str]:
    """The tokens of the target visit's hint: the last "(usually ...)" of a response prefix, whose places come
    with or without counts, each count after its place ("<code> ×12") or before it ("×12 <code>")."""
    m = re.search(r"\(usually ([^)]*)\)\s*$", text or "")
    return m.group(1).split() if m else []


def hint_places(prefixes: list[str], code_to_loc: dict[str, int]) -> list[list[int]]:
    """The hinted places of each target visit (location ids; -2 for a code not in the table)."""
    return [[code_to_loc.get(t, -2) for t in _hint_tokens(text) if not t.startswith("×")] for text in prefixes]


def hint_counts(prefixes: list[str]) -> list[list[int]]:
    """The train-visit counts of those hinted places, in the places' order (either form: "<code> ×12" or
    "×12 <code>"); empty without ``visit_hint_counts``."""
    return [[int(t[1:]) for t in _hint_tokens(text) if t.startswith("×") and t[1:].isdigit()] for text in prefixes]


SOURCES = {-1: "a visit of the prompt (not hinted)", -2: "another visit's hint", -3: "not in the prompt"}


def prompt_places(prefixes: list[str], contexts: list[Any], code_to_loc: dict[str, int]) -> list[tuple[set[int], set[int]]]:
    """Per case, the places of its prompt's visits and every place its response prefix names (visits and hints)."""
    out = []
    for text, context in zip(prefixes, contexts):
        visits = set() if context is None else {int(x) for x in context}
        named = {code_to_loc.get(c, -2) for c in re.findall(r"(?:<[a-z]_\d+>)+", text or "")}
        out.append((visits, named))
    return out


def first_guess_source(guess: int, hint: list[int], visits: set[int], named: set[int]) -> int:
    """Where a first guess comes from: k for the target hint's (k+1)-th place, -1 a visit of the prompt, -2 a
    place named only in another visit's hint, -3 a place the prompt does not name (keys of :data:`SOURCES`)."""
    if guess in hint:
        return hint.index(guess)
    return -1 if guess in visits else -2 if guess in named else -3


def calibration(locs: np.ndarray, scores: np.ndarray, target: np.ndarray, place: np.ndarray) -> list[float]:
    """For one candidate place per case (-1: none): how often it is the target, the model's mean probability of
    it (0 where it is outside the beam, so a lower bound) and how often it is the model's first guess."""
    ok = place >= 0
    in_beam = locs == place[:, None]
    prob = np.where(in_beam, np.exp(scores), 0.0).sum(1)
    return [float((place[ok] == target[ok]).mean()), float(prob[ok].mean()), float((locs[ok, 0] == place[ok]).mean())] \
        if ok.any() else [0.0, 0.0, 0.0]


def main() -> None:
    import polars as pl
    import torch

    from lightning_modules.metrics import paired_bootstrap
    from lightning_modules.ranking import rank_prompts
    from lightning_modules.user_time import UserTimeBaseline, params_dict, tune_user_time
    from location_tokenizers.codes import CodeTable
    from pipeline.paths import read_data, run_dir, run_precision, test_fingerprint
    from pipeline.test import load_for_eval, test_prompts, valid_cases, valid_index
    from tests.conftest import compose_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--valid-cases", type=int, default=1000, help="seeded valid next-location cases that pick the fusion")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = compose_run(args.overrides)
    run = run_dir(cfg)
    folder = run / "model"
    if not (folder / "qtmob.json").is_file():
        sys.exit(f"error: {folder} has no aligned model: run `python run.py {' '.join(args.overrides)} stage=align` first")
    out = run / "llm_vs_user_time"
    out.mkdir(exist_ok=True)
    fp = test_fingerprint(cfg)
    table = CodeTable.read_parquet(folder / "codes.parquet")
    checkins = read_data(cfg, "checkins.parquet")
    index = valid_index(cfg).filter(pl.col("task") == "next")
    if index.height > args.valid_cases:
        index = index.filter(pl.int_range(pl.len()).shuffle(seed=int(cfg.seed)) < args.valid_cases)
    model = encoder = trie = None
    split: dict[str, tuple[pl.DataFrame, np.ndarray, np.ndarray]] = {}
    for name, idx in (("valid", index), ("test", None)):
        cache, key = out / f"{name}.npz", f"{fp}/{index.height}"
        if not (cache.is_file() and str(np.load(cache)["fingerprint"]) == key):  # another run's (or none): rank
            if model is None:
                model, _, encoder, trie, _ = load_for_eval(cfg, folder, table)
            cases, prompts, _ = test_prompts(cfg, table, encoder, checkins, idx)
            locs, scores = rank_prompts(model, encoder, trie, prompts, int(cfg.eval.num_beams), int(cfg.eval.batch_size),
                                        precision=run_precision(cfg), share_prefix=bool(cfg.eval.share_prefix),
                                        code_softmax=cfg.align.code_softmax)
            cases.drop("prompt").write_parquet(out / f"{name}_cases.parquet")
            part = out / f"{name}.part.npz"  # renamed when whole: a killed call leaves nothing a later one reuses
            np.savez(part, fingerprint=key, locs=locs, scores=scores, target=cases["target_loc"].to_numpy())
            part.replace(cache)
        cases, kept = pl.read_parquet(out / f"{name}_cases.parquet"), np.load(cache)
        if not np.array_equal(kept["target"], cases["target_loc"].to_numpy()):
            sys.exit(f"error: {cache} does not match {name}_cases.parquet beside it: delete both and rerun")
        split[name] = (cases, kept["locs"], kept["scores"])

    train = checkins.filter(pl.col("split") == "train")
    ut = UserTimeBaseline(train, size=int(cfg.eval.top_k))
    params, _ = tune_user_time(ut, valid_cases(cfg, checkins).filter(pl.col("task") == "next"))  # as stage=test does
    strings = table.strings()
    code_to_loc = dict(zip(strings["code"].to_list(), strings["loc_id"].to_list()))
    report: dict[str, Any] = {"fingerprint": fp, "user_time": params_dict(params)}
    deep_ut = UserTimeBaseline(train, size=30)  # user_time's top 30, for the reranking figures
    lines = [f"# The LLM against user_time: {cfg.data.name} / {cfg.run_name}", ""]
    ut_ranks: dict[str, np.ndarray] = {}
    for name, (cases, locs, scores) in split.items():
        target = cases["target_loc"].to_numpy()
        ut_ranked = ut_ranks[name] = ut.rank(cases, params)
        llm_right, ut_right = locs[:, 0] == target, ut_ranked[:, 0] == target
        differ = locs[:, 0] != ut_ranked[:, 0]
        prefixes = cases["response_prefix"].to_list()
        hints = hint_places(prefixes, code_to_loc)
        seen = prompt_places(prefixes, cases["context"].to_list(), code_to_loc)
        pick = np.array([first_guess_source(g, h, v, p) for h, (v, p), g in zip(hints, seen, locs[:, 0])])
        hint1 = np.array([h[0] if h else -1 for h in hints])
        r = {"cases": int(len(target)), "llm_acc@1": float(llm_right.mean()), "user_time_acc@1": float(ut_right.mean()),
             "hint1_acc@1": float((hint1 == target).mean()), "both": float((llm_right & ut_right).mean()),
             "llm_only": float((llm_right & ~ut_right).mean()), "user_time_only": float((ut_right & ~llm_right).mean()),
             "disagree": float(differ.mean()), "disagree_llm_acc@1": float(llm_right[differ].mean()) if differ.any() else None,
             "disagree_user_time_acc@1": float(ut_right[differ].mean()) if differ.any() else None,
             "first_guess": {SOURCES.get(k, f"hint {k + 1}"): [float((pick == k).mean()),
                             float(llm_right[pick == k].mean()) if (pick == k).any() else None,
                             float((hint1 == target)[pick == k].mean()) if (pick == k).any() else None]
                             for k in (0, 1, 2, -1, -2, -3)}}
        last = np.array([c[-1] if c is not None and len(c) else -1 for c in cases["context"].to_list()])
        sources = {f"hint {k + 1}": np.array([h[k] if len(h) > k else -1 for h in hints]) for k in range(3)}
        r["calibration"] = {label: calibration(locs, scores, target, place) for label, place in {**sources, "last visit": last}.items()}
        counts = np.array([c[0] if c else -1 for c in hint_counts(cases["response_prefix"].to_list())])
        if (counts >= 0).any():
            r["calibration_by_hint1_count"] = {
                f"{lo}-{hi}": [int(((counts >= lo) & (counts <= hi)).sum()),
                               *calibration(locs, scores, target, np.where((counts >= lo) & (counts <= hi), hint1, -1))]
                for lo, hi in ((1, 1), (2, 3), (4, 9), (10, 10**6))}
        deep = deep_ut.rank(cases, params)
        rerank = {}
        for k in (2, 3, 5, 10, 30):  # the LLM's first beam entry among user_time's top k (none there: user_time's first)
            first = [next((x for x in beam if x in set(top[:k].tolist())), top[0]) for beam, top in zip(locs, deep)]
            rerank[k] = float((np.asarray(first) == target).mean())
        r["llm_reranks_user_time_top_k"] = rerank
        report[name] = r
        lines += [f"## {name}: {r['cases']} next-location cases", "",
                  f"Acc@1: LLM {r['llm_acc@1']:.3f}, user_time {r['user_time_acc@1']:.3f}, the hint's first place alone "
                  f"{r['hint1_acc@1']:.3f}. Right: both {r['both']:.3f}, only the LLM {r['llm_only']:.3f}, "
                  f"only user_time {r['user_time_only']:.3f}. Their first guesses differ in {r['disagree']:.3f} of the cases; "
                  f"there the LLM is right {r['disagree_llm_acc@1'] or 0:.3f}, user_time {r['disagree_user_time_acc@1'] or 0:.3f}.", "",
                  "| LLM's first guess | share | Acc@1 among them | the hint's first place there |", "|---|---|---|---|"]
        lines += [f"| {k} | {v[0]:.3f} | {'' if v[1] is None else f'{v[1]:.3f}'} | {'' if v[2] is None else f'{v[2]:.3f}'} |"
                  for k, v in r["first_guess"].items()]
        lines += ["", "Calibration: how often a place is the target, the model's mean probability of it (0 outside the beam) "
                  "and how often the model names it first:", "", "| place | is the target | model's P | first guess |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.3f} |" for k, v in r["calibration"].items()]
        for k, v in r.get("calibration_by_hint1_count", {}).items():
            lines.append(f"| hint 1 with {k.replace('-1000000', '+')} visits ({v[0]} cases) | {v[1]:.3f} | {v[2]:.3f} | {v[3]:.3f} |")
        lines += ["", "The LLM choosing among user_time's top k (its first beam entry there), Acc@1: " + ", ".join(
            f"k={k} {v:.3f}" for k, v in rerank.items()) + f" (user_time's own order: {r['user_time_acc@1']:.3f})."]
        lines.append("")

    cases, locs, scores = split["valid"]
    cand, ut_score = ut.scores(cases, params)
    target = cases["target_loc"].to_numpy()
    grid = {}
    for point in RRF_GRID + LOGLIN_GRID:
        h = hits(fuse(locs, scores, cand, ut_score, point), target)
        grid[point] = (float(h["acc@1"].mean()), float(h["ndcg@5"].mean()))
    base = hits(ut_ranks["valid"], target)
    best = max(grid, key=lambda p: sum(grid[p]))
    report["valid_fusion"] = {"user_time": [float(base["acc@1"].mean()), float(base["ndcg@5"].mean())],
                              "best": list(best), "best_figures": list(grid[best]),
                              "grid": [[*p, *v] for p, v in grid.items()]}
    lines += ["## Fusion picked on the valid cases", "",
              f"user_time alone: Acc@1 {base['acc@1'].mean():.3f}, NDCG@5 {base['ndcg@5'].mean():.4f}. Best of "
              f"{len(grid)} points: {best} with Acc@1 {grid[best][0]:.3f}, NDCG@5 {grid[best][1]:.4f}.", ""]
    cases, locs, scores = split["test"]
    cand, ut_score = ut.scores(cases, params)
    target = cases["target_loc"].to_numpy()
    values = {"fused": hits(fuse(locs, scores, cand, ut_score, best), target),
              "user_time": hits(ut_ranks["test"], target), "LLM": hits(locs, target)}
    b = paired_bootstrap(values, "fused", ("acc@1", "ndcg@5"), resamples=int(cfg.eval.bootstrap.resamples),
                         seed=int(cfg.eval.bootstrap.seed), level=float(cfg.eval.bootstrap.level))
    report["test_fusion"] = {"figures": {k: {m: float(v.mean()) for m, v in h.items()} for k, h in values.items()},
                             "differences": b["differences"]}
    lines += ["## The picked fusion on the test cases", "", "| row | Acc@1 | NDCG@5 | Δ Acc@1 (fused − row) | Δ NDCG@5 |",
              "|---|---|---|---|---|"]
    for k, h in values.items():
        d = b["differences"].get(k)
        cells = ["", ""] if d is None else [f"{d[m]['diff']:+.4f} ({d[m]['ci'][0]:+.3f} to {d[m]['ci'][1]:+.3f})"
                                             for m in ("acc@1", "ndcg@5")]
        lines.append(f"| {k} | {h['acc@1'].mean():.4f} | {h['ndcg@5'].mean():.4f} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
