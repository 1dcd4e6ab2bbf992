"""Gather a multirun (sweep) folder into one table and one chart: ``stage=report report.sweep=<folder>``.

Every grid point of ``python run.py -m ...`` leaves ``<sweep>/<n>/qtmob_job.json`` (written by
``run.py``: status, run folder, overrides). The report reads each point's ``results.json`` and
writes, in the sweep folder:

* ``report.md`` / ``report.csv``: one row per grid point and evaluated task (the LLM), then the
  in-run baselines of those points (once each when the points share their test cases);
* ``report.png``: Acc@1 and NDCG@5 per grid point beside the baselines;
* in ``report.md``/``report.json`` (``paired``), each point's LLM against the first point's on the same test
  cases, with paired bootstrap intervals of the Acc@1 and NDCG@5 differences (``eval.bootstrap``), from the
  points' ``rankings.parquet``.

A point without a record died before ``run.py`` could write one (killed, out of memory, SLURM
time limit): it is listed as ``died`` with the last line of its SLURM/submitit log when there is one.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from datamodules.artifacts import atomic_file, write_json_atomic, write_text_atomic
from datamodules.errors import DataError
from pipeline.config import load_config

log = logging.getLogger(__name__)

METRICS = ("acc@1", "acc@5", "acc@10", "ndcg@5", "ndcg@10", "mrr")
JOB_RECORD = "qtmob_job.json"
# Overrides every point of a grid shares (where and how it runs, not what it is): left out of its name.
SHARED_OVERRIDES = ("experiment", "ablation", "launcher", "stage", "force", "paths.", "data.root", "data.download", "report.")


def point_name(overrides: list[str], num: int) -> str:
    """A grid point's name from its overrides (``objectives=next_only,seed=2``), without the shared ones."""
    own = sorted(o for o in overrides if not o.lstrip("+~").split("=", 1)[0].startswith(SHARED_OVERRIDES))
    return ",".join(own).replace("/", "_") or f"job{num}"


def _log_tail(sweep: Path, num: int) -> str | None:
    """Last non-empty stderr line of grid point ``num``'s submitit log (SLURM launcher), if any."""
    logs = sorted(sweep.glob(f".submit/*_{num}/*_log.err")) + sorted(sweep.glob(f".submit/*/*_{num}_*_log.err"))
    for path in logs:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return f"{path.name}: {lines[-1][:300]}"
    return None


def planned_points(sweep: Path) -> list[list[str]]:
    """Every grid point's overrides, in job order, re-expanded from ``multirun.yaml`` the way Hydra's
    basic sweeper expands them (the grid file's ``hydra.sweeper.params`` first, then the command line),
    so that a point whose job died before it could create its folder is still listed."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = sweep / "multirun.yaml"
    if not path.is_file():
        return []
    cfg = OmegaConf.load(path)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(OmegaConf.select(cfg, "hydra.overrides.task") or [])
    overrides = OverridesParser.create().parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def gather(sweep: str | Path) -> list[dict[str, Any]]:
    """One entry per grid point of a sweep folder, in job order.

    Returns:
        Dicts with ``num``, ``point`` (the variant or the overrides), ``overrides``, ``status``
        (``ok``/``failed``/``died``/``no results``), ``error``, ``results`` (the parsed results.json or None).
    """
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise DataError(f"report.sweep={sweep} is not a folder (expected <paths.artifacts>/multirun/<time>)")
    points = []
    planned = planned_points(sweep)
    started = {int(p.name) for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()}
    for num in sorted(started | set(range(len(planned)))):
        sub = sweep / str(num)
        overrides_file = sub / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else planned[num] if num < len(planned) else []
        entry: dict[str, Any] = {"num": num, "overrides": overrides or [], "status": "died", "error": None, "results": None, "point": None}
        record_file = sub / JOB_RECORD
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            entry.update(status=record["status"], error=record.get("error"), point=record.get("variant"))
            results = Path(record["run_dir"] or sub) / "results.json"  # no run_dir: the config itself failed
            if record["status"] == "ok":
                if results.is_file():
                    entry["results"] = json.loads(results.read_text())
                    entry["run_dir"] = str(results.parent)
                else:
                    entry.update(status="no results", error=f"{results} is missing (was stage=test run?)")
        else:
            entry["error"] = _log_tail(sweep, num) or "no record: the job was killed before it finished"
        entry["point"] = entry["point"] or point_name(entry["overrides"], num)
        points.append(entry)
    if not points:
        raise DataError(f"{sweep} holds no grid points (numbered folders with .hydra/); is it a multirun folder?")
    return points


def table_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows: the LLM of every point and task, then each distinct baseline result once."""
    rows: list[dict[str, Any]] = []
    baselines: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        base = {"point": p["point"], "status": p["status"], "overrides": " ".join(p["overrides"])}
        if p["results"] is None:
            rows.append({**base, "model": "", "task": "", **{m: None for m in METRICS}, "error": p["error"] or ""})
            continue
        for model, tasks in p["results"]["metrics"].items():
            is_llm = model.startswith("QT-Mob")
            for task, values in tasks.items():
                row = {**base, "model": model, "task": task, **{m: values.get(m) for m in METRICS}, "error": ""}
                if is_llm:
                    rows.append(row)
                else:
                    baselines.setdefault((model, task), []).append(row)
    for (model, task), found in sorted(baselines.items()):
        distinct: list[dict[str, Any]] = []
        for row in found:
            if not any(all(row[m] == d[m] for m in METRICS) for d in distinct):
                distinct.append(row)
        for row in distinct:
            shared = len(distinct) == 1
            rows.append({**row, "point": "baseline" if shared else f"baseline @ {row['point']}", "overrides": "" if shared else row["overrides"]})
    return rows


CASE_KEY = ("task", "traj_id", "target_pos", "target_loc")


def paired_rows(points: list[dict[str, Any]], resamples: int = 1000, seed: int = 0, level: float = 0.95,
                top_k: int = 10) -> list[dict[str, Any]]:
    """Each grid point's LLM against the first point's, per task, on the cases both ranked (paired bootstrap of
    Acc@1 and NDCG@5 from their ``rankings.parquet``). Points without rankings (runs from before it was written)
    are left out; a point whose cases differ from the reference's gets a row saying so instead of intervals."""
    import numpy as np
    import polars as pl

    from lightning_modules.metrics import paired_bootstrap, per_case

    def llm(p: dict[str, Any]) -> pl.DataFrame | None:
        path = Path(p.get("run_dir") or "") / "rankings.parquet"
        name = (p["results"] or {}).get("reference")
        if not path.is_file() or not name or not str(name).startswith("QT-Mob"):
            return None
        return pl.read_parquet(path, columns=[*CASE_KEY, name]).rename({name: "ranked"})

    found = [(p, llm(p)) for p in points if p["results"] is not None]
    found = [(p, r) for p, r in found if r is not None]
    if len(found) < 2:
        return []
    (ref_point, ref), rows = found[0], []
    for point, other in found[1:]:
        both = ref.join(other, on=list(CASE_KEY), suffix="_row")
        if both.height != ref.height or both.height != other.height:
            rows.append({"point": point["point"], "reference": ref_point["point"], "task": "", "cases": both.height,
                         "error": f"other test cases ({other.height}) than the reference's ({ref.height}): not paired"})
            continue
        for task in both["task"].unique(maintain_order=True).to_list():
            part = both.filter(pl.col("task") == task)
            target = part["target_loc"].to_numpy()
            values = {name: per_case(np.array(part[col].to_list())[:, :top_k], target)
                      for name, col in (("point", "ranked_row"), ("reference", "ranked"))}
            d = paired_bootstrap(values, "point", ("acc@1", "ndcg@5"), resamples=resamples, seed=seed, level=level)["differences"]["reference"]
            rows.append({"point": point["point"], "reference": ref_point["point"], "task": task, "cases": part.height, "error": "",
                         **{f"delta {m}": d[m]["diff"] for m in ("acc@1", "ndcg@5")},
                         **{f"ci {m}": d[m]["ci"] for m in ("acc@1", "ndcg@5")}})
    return rows


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict[str, Any]], sweep: Path, paired: list[dict[str, Any]] | None = None) -> str:
    cols = ["point", "model", "task", *METRICS, "status"]
    lines = [f"# Sweep report: {sweep}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    if paired:
        lines += ["", f"Each point's LLM − the first point's ({paired[0]['reference']}) on the same test cases, paired 95 % "
                  "bootstrap interval (✓: above 0; ✗: below 0):", "", "| point | task | cases | Δ acc@1 | Δ ndcg@5 |", "|---|---|---|---|---|"]
        for r in paired:
            if r["error"]:
                lines.append(f"| {r['point']} | | {r['cases']} | {r['error']} | |")
                continue
            cells = []
            for m in ("acc@1", "ndcg@5"):
                lo, hi = r[f"ci {m}"]
                cells.append(f"{r[f'delta {m}']:+.4f} ({lo:+.3f} to {hi:+.3f})" + (" ✓" if lo > 0 else " ✗" if hi < 0 else ""))
            lines.append(f"| {r['point']} | {r['task']} | {r['cases']} | {cells[0]} | {cells[1]} |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "Grid points without results:", ""] + [f"- {r['point']}: {r['status']} ({r['error']})" for r in failed]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], task: str, path: Path) -> None:
    """Acc@1 and NDCG@5 on ``task`` per grid point (LLM) and per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    picked = [r for r in rows if r["task"] == task and r["acc@1"] is not None]
    labels = [r["point"] if r["model"].startswith("QT-Mob") else f"{r['model']}" + ("" if r["point"] == "baseline" else f" ({r['point']})") for r in picked]
    x = np.arange(len(picked))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(picked) + 2), 4.5))
    for i, (metric, offset) in enumerate((("acc@1", -0.2), ("ndcg@5", 0.2))):
        colors = [("C0" if i == 0 else "C1") if r["model"].startswith("QT-Mob") else ("0.55" if i == 0 else "0.8") for r in picked]
        ax.bar(x + offset, [r[metric] for r in picked], width=0.4, color=colors, label=metric)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{task}: Acc@1 (left bar) / NDCG@5 (right bar)")
    ax.set_title("QT-Mob grid points (colour) and in-run baselines (grey)")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run_report_stage(cfg: Any) -> dict[str, Any]:
    """``stage=report``: write report.md/.csv/.png into ``report.sweep`` and return the rows."""
    cfg = load_config(cfg)
    sweep_arg = cfg.report.sweep
    if not sweep_arg:
        raise DataError("stage=report needs report.sweep=<multirun folder> (e.g. artifacts/multirun/2026-11-29_12-00-00)")
    sweep = Path(str(sweep_arg))
    points = gather(sweep)
    rows = table_rows(points)
    b = cfg.eval.bootstrap
    paired = paired_rows(points, resamples=int(b.resamples), seed=int(b.seed), level=float(b.level), top_k=int(cfg.eval.top_k))
    text = markdown(rows, sweep, paired)
    write_text_atomic(sweep / "report.md", text)
    with atomic_file(sweep / "report.csv") as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["point", "model", "task", *METRICS, "status", "overrides", "error"])
        writer.writeheader()
        writer.writerows(rows)
    bar_chart(rows, cfg.report.task, sweep / "report.png")
    summary = {"sweep": str(sweep), "points": len(points), "ok": sum(p["status"] == "ok" for p in points),
               "failed": [p["point"] for p in points if p["status"] != "ok"], "markdown": text, "rows": rows, "paired": paired}
    write_json_atomic(sweep / "report.json", {k: v for k, v in summary.items() if k != "markdown"})
    log.info("report: %d grid points (%d ok) -> %s", summary["points"], summary["ok"], sweep / "report.md")
    return summary


__all__ = ["gather", "paired_rows", "point_name", "run_report_stage", "table_rows"]
