"""Scoring ranked lists and writing the results table, with intervals a reviewer can trust.

Every row (the aligned model and each baseline) is scored on the same cases; a seeded paired
bootstrap gives a 95 % interval for every metric of every row and for the difference between the
reference row (the model in ``stage=test``, ``user_time`` in ``stage=baselines``) and each other row
on Acc@1 and NDCG@5. A row is *beaten* only when the whole interval of the difference is above zero
on both metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from lightning_modules.metrics import RankingMetrics, paired_bootstrap, per_case

METRIC_ORDER = ("acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr")
TASK_LABEL = {"next": "next-location", "recovery_single": "recovery"}
DIFF_METRICS = ("acc@1", "ndcg@5")


def score(ranked: np.ndarray | torch.Tensor, target: np.ndarray, top_k: int) -> dict[str, float]:
    """Metrics of ranked lists against targets (cut to ``top_k``)."""
    metric = RankingMetrics()
    # Copies: Polars hands out read-only arrays, which torch refuses to wrap without a warning.
    metric.update(torch.tensor(np.array(ranked)[:, :top_k], dtype=torch.long), torch.tensor(np.array(target), dtype=torch.long))
    return {k: round(float(v), 6) for k, v in metric.compute().items()}


def _task_rows(cases: pl.DataFrame) -> dict[str, np.ndarray]:
    tasks = cases["task"].to_numpy()
    return {t: np.flatnonzero(tasks == t) for t in cases["task"].unique(maintain_order=True).to_list()}


def score_by_task(ranked: np.ndarray, cases: pl.DataFrame, top_k: int) -> dict[str, dict[str, float]]:
    """``{task: metrics}`` over the cases of each task."""
    target = cases["target_loc"].to_numpy()
    return {task: score(ranked[rows], target[rows], top_k) for task, rows in _task_rows(cases).items()}


def bootstrap_by_task(rankings: dict[str, np.ndarray], cases: pl.DataFrame, top_k: int, reference: str | None,
                      resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """``{task: paired_bootstrap(...)}`` of every ranking on the cases of each task."""
    target = cases["target_loc"].to_numpy()
    out = {}
    for task, rows in _task_rows(cases).items():
        values = {name: per_case(np.asarray(r)[rows, :top_k], target[rows]) for name, r in rankings.items()}
        out[task] = paired_bootstrap(values, reference, DIFF_METRICS, resamples=resamples, seed=seed, level=level)
    return out


def beaten(intervals: dict[str, dict]) -> dict[str, list[str]]:
    """``{task: [rows the reference beats]}``: the whole interval of the difference above 0 on Acc@1 and NDCG@5."""
    return {
        task: [other for other, d in b["differences"].items() if all(d[m]["above_zero"] for m in DIFF_METRICS)]
        for task, b in intervals.items()
    }


def hit_split(rankings: dict[str, np.ndarray], cases: pl.DataFrame, reference: str | None) -> dict[str, dict[str, Any]]:
    """Per task and row, the cases whose first guess only the reference gets right, and those only the row gets
    right (shares of the cases). Their difference is the Acc@1 difference; their sizes say whether two rows
    know different things (both large: a choice between them per case could gain) or the same (both small).

    Returns ``{task: {row: {"reference_only": share, "row_only": share, "both": share}}}`` (empty without a reference).
    """
    if reference is None or reference not in rankings:
        return {}
    target = cases["target_loc"].to_numpy()
    out: dict[str, dict[str, Any]] = {}
    for task, rows in _task_rows(cases).items():
        ref = np.asarray(rankings[reference])[rows, 0] == target[rows]
        out[task] = {}
        for name, ranked in rankings.items():
            if name == reference:
                continue
            row = np.asarray(ranked)[rows, 0] == target[rows]
            out[task][name] = {"reference_only": round(float((ref & ~row).mean()), 4),
                               "row_only": round(float((row & ~ref).mean()), 4), "both": round(float((ref & row).mean()), 4)}
    return out


GUESS_SOURCES = ("last visit", "earlier visit", "elsewhere")


def first_guesses(rankings: dict[str, np.ndarray], cases: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Where the first guesses of next-location cases come from: the prompt's last visit, an earlier visit of
    the prompt, or elsewhere; beside the targets' own shares. A row that names the last visit far more often
    than targets are the last visit copies its prompt rather than predicting from it.

    Returns ``{"next": {"targets": {source: share}, row: {source: [share, acc@1 among them or None]}}}``
    (empty without next-location cases).
    """
    rows = np.flatnonzero(cases["task"].to_numpy() == "next")
    if not rows.size:
        return {}
    context = cases["context"].to_list()
    ctx = [context[i] or [] for i in rows]
    target = cases["target_loc"].to_numpy()[rows]

    def sources(guess: np.ndarray) -> np.ndarray:
        last = np.array([bool(c) and g == c[-1] for g, c in zip(guess, ctx)])
        earlier = np.array([g in c[:-1] for g, c in zip(guess, ctx)]) & ~last
        return np.where(last, 0, np.where(earlier, 1, 2))

    def shares(src: np.ndarray, right: np.ndarray | None = None) -> dict[str, Any]:
        out = {}
        for k, name in enumerate(GUESS_SOURCES):
            hit = src == k
            share = round(float(hit.mean()), 4)
            out[name] = share if right is None else [share, round(float(right[hit].mean()), 4) if hit.any() else None]
        return out

    table: dict[str, Any] = {"targets": shares(sources(target))}
    for name, ranked in rankings.items():
        top1 = np.asarray(ranked)[rows, 0]
        table[name] = shares(sources(top1), top1 == target)
    return {"next": table}


def _cell(value: float, ci: list[float] | None) -> str:
    return f"{value:.4f}" if ci is None else f"{value:.4f} ({ci[0]:.3f}–{ci[1]:.3f})"


def _signed(d: dict[str, Any]) -> str:
    mark = " ✓" if d["above_zero"] else ""
    return f"{d['diff']:+.4f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}){mark}"


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: one row per model and task with 95 % intervals, then the paired differences."""
    intervals = results.get("intervals") or {}
    lines = [
        f"# Results: {results['dataset']} / {results.get('run', 'baselines')}",
        "",
        "Cases: " + ", ".join(f"{TASK_LABEL.get(t, t)} {n}" for t, n in results["cases"].items()),
    ]
    cut = results.get("cut_history") or {}
    if any(cut.values()):
        lines += ["", "Prompts whose oldest history visits were cut to fit align.max_length: "
                  + ", ".join(f"{TASK_LABEL.get(t, t)} {n}" for t, n in cut.items())]
    if intervals:
        b = next(iter(intervals.values()))
        lines += ["", f"Cells: value ({int(b['level'] * 100)} % paired bootstrap interval, {b['resamples']} resamples, seed {b['seed']})."]
    lines += ["", "| model | task | " + " | ".join(METRIC_ORDER) + " |", "|---|---|" + "---|" * len(METRIC_ORDER)]
    for model, per_task in results["metrics"].items():
        for task, m in per_task.items():
            ci = intervals.get(task, {}).get("intervals", {}).get(model, {})
            lines.append(f"| {model} | {TASK_LABEL.get(task, task)} | " + " | ".join(_cell(m[k], ci.get(k)) for k in METRIC_ORDER) + " |")
    reference = results.get("reference")
    if reference and any(b["differences"] for b in intervals.values()):
        split = results.get("hit_split") or {}
        lines += ["", f"Paired differences {reference} − row (✓: the whole interval is above 0). First guess right "
                  f"only for {reference} / only for the row: shares of the cases (their difference is Δ acc@1):", "",
                  "| task | row | Δ acc@1 | Δ ndcg@5 | beaten | right only: reference / row |", "|---|---|---|---|---|---|"]
        wins = beaten(intervals)
        for task, b in intervals.items():
            for other, d in b["differences"].items():
                sp = split.get(task, {}).get(other)
                only = "" if sp is None else f"{sp['reference_only']:.3f} / {sp['row_only']:.3f}"
                lines.append(f"| {TASK_LABEL.get(task, task)} | {other} | {_signed(d['acc@1'])} | {_signed(d['ndcg@5'])} | "
                             f"{'yes' if other in wins[task] else 'no'} | {only} |")
        for task, rows in wins.items():
            lines.append("")
            lines.append(f"{TASK_LABEL.get(task, task)}: {reference} beats " + (", ".join(rows) if rows else "none of the rows")
                         + " (Acc@1 and NDCG@5, whole 95 % interval of the difference above 0).")
    guesses = (results.get("first_guesses") or {}).get("next")
    if guesses:
        lines += ["", "Where next-location first guesses come from (share of cases; in brackets, Acc@1 among them). "
                  "A row far above the targets' share of the last visit copies it more often than people return to it:",
                  "", "| row | " + " | ".join(GUESS_SOURCES) + " |", "|---|" + "---|" * len(GUESS_SOURCES)]
        for name, per in guesses.items():
            cells = [f"{per[k]:.3f}" if name == "targets" else
                     f"{per[k][0]:.3f}" + ("" if per[k][1] is None else f" ({per[k][1]:.3f})") for k in GUESS_SOURCES]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if results.get("tuned"):
        lines += ["", "Picked on the valid split only (never on test cases):"]
        for name, per_task in results["tuned"].items():
            for task, info in per_task.items():
                chosen = ", ".join(f"{k} {v}" for k, v in info.items() if k != "valid")
                valid = info.get("valid") or {}
                seen = f" (valid Acc@1 {valid['acc@1']:.3f} on {valid['cases']} cases)" if "acc@1" in valid else ""
                lines.append(f"- {name}, {TASK_LABEL.get(task, task)}: {chosen}{seen}")
    if results.get("exact"):
        lines += ["", "Beam search vs exact scoring of every code: " + ", ".join(
            f"{TASK_LABEL.get(t, t)}: top-1 differs in {e['top1_miss_rate']:.1%} of {e['cases']} cases, "
            f"{e['top10_recall']:.1%} of the exact top-10 found" for t, e in results["exact"].items())]
    return "\n".join(lines) + "\n"


__all__ = ["DIFF_METRICS", "GUESS_SOURCES", "METRIC_ORDER", "TASK_LABEL", "beaten", "bootstrap_by_task", "first_guesses",
           "hit_split", "results_markdown", "score", "score_by_task"]
