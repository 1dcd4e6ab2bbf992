"""Entry point of the QT-Mob suite: ``python run.py [experiment=...] [stage=...] [key=value ...]``.

``main()`` is only the Hydra wrapper; ``run(cfg)`` does the work and returns the metrics, so tests
and sweeps call the same code path.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.artifacts import run_dir, write_json_atomic

from datamodules.data_stage import run_data_stage
from datamodules.errors import DataError
from lightning_modules.align_stage import run_align_stage, validate_align
from lightning_modules.evaluation import results_markdown, run_baselines_stage, run_predict_stage, run_test_stage
from lightning_modules.llm import ModelUnavailableError
from lightning_modules.report import JOB_RECORD, point_name, run_report_stage
from location_tokenizers.tokenizer_stage import run_tokenizer_stage

log = logging.getLogger("qtmob")

# Stages in pipeline order; `stage=all` runs them in turn, `stage=<name>` runs one.
STAGES: dict[str, Callable[[DictConfig], Any]] = {
    "data": run_data_stage,
    "tokenizer": run_tokenizer_stage,
    "align": run_align_stage,
    "test": run_test_stage,
}
# Stages that run only when asked for by name (not part of stage=all). report gathers a sweep folder.
ON_DEMAND: dict[str, Callable[[DictConfig], Any]] = {
    "baselines": run_baselines_stage,
    "predict": run_predict_stage,
    "report": run_report_stage,
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stage(s).

    Args:
        cfg: The composed config (``experiments/run.yaml`` plus overrides).

    Returns:
        ``{stage: result}`` for every stage that ran.
    """
    stage = str(cfg.stage)
    known = {**STAGES, **ON_DEMAND}
    if stage != "all" and stage not in known:
        raise DataError(f"stage={stage!r} is not one of: all, {', '.join(known)}")
    names = list(STAGES) if stage == "all" else [stage]
    if {"align", "test", "predict"} & set(names):
        validate_align(cfg)  # a bad align setting fails here, before the data and tokenizer stages run
    return {name: known[name](cfg) for name in names}


def _hydra() -> Any:
    return HydraConfig.get() if HydraConfig.initialized() else None


def name_grid_point(cfg: DictConfig) -> None:
    """In a multirun, give a grid point without an ablation ``variant`` one named after its overrides
    (``objectives=next_only,seed=2``), so that the points of a grid never share a run folder."""
    hc = _hydra()
    if hc is None or hc.mode != RunMode.MULTIRUN or cfg.get("variant"):
        return
    with open_dict(cfg):
        cfg.variant = point_name(list(hc.overrides.task), hc.job.num)


def write_job_record(cfg: DictConfig, status: str, stages: list[str], error: str | None = None) -> None:
    """``<hydra output dir>/qtmob_job.json``: what this job ran and where (read by ``stage=report``)."""
    hc = _hydra()
    if hc is None or str(cfg.stage) == "report":
        return
    write_json_atomic(Path(hc.runtime.output_dir) / JOB_RECORD, {
        "status": status, "error": error, "stage": str(cfg.stage), "stages": stages, "run_dir": str(run_dir(cfg)),
        "variant": cfg.get("variant"), "overrides": list(hc.overrides.task),
    })


@hydra.main(config_path="experiments", config_name="run", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`run`; input problems end with a message, not a traceback."""
    from lightning_modules.quiet import quiet_known_noise

    quiet_known_noise()
    name_grid_point(cfg)
    try:
        results = run(cfg)
    except (DataError, ModelUnavailableError) as exc:
        write_job_record(cfg, "failed", [], f"{type(exc).__name__}: {exc}")
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except BaseException as exc:  # a crash or Ctrl-C: recorded for the sweep report, then raised as usual
        write_job_record(cfg, "failed", [], f"{type(exc).__name__}: {exc}")
        raise
    write_job_record(cfg, "ok", list(results))
    if "data" in results:
        summary = results["data"]
        print(
            f"data [{summary['dataset']}]: {summary['checkins']} check-ins, {summary['trajectories']} trajectories, "
            f"{summary['users']} users, {summary['locations']} locations; samples: "
            + ", ".join(f"{t}={sum(s.values())}" for t, s in summary["samples"].items())
            + f"; quarantined rows: {summary['quarantined_rows']}"
        )
    if "tokenizer" in results:
        m = results["tokenizer"]
        print(
            f"tokenizer [{m['tokenizer']}]: {m['locations']} locations, collisions {m['collisions']}, "
            f"codes used per level {m['usage_per_level']}, mean km within level-1 groups {m['mean_km_same_l1']:.2f} "
            f"(random pairs {m['mean_km_random']:.2f}), category purity of level-1+2 groups {m['category_purity_l12']:.3f}"
        )
    if "align" in results:
        a = results["align"]
        losses = ", ".join(f"{k.split('/', 2)[2]} {v:.3f}" for k, v in sorted(a["metrics"].items()) if k.startswith("align/val/loss"))
        print(
            f"align [{a['llm']}, {a['quantization']}, new tokens: {a['new_tokens_mode']}]: {a['steps']} steps in {a['seconds']:.0f} s, "
            f"{a['trainable_params']:,} trainable parameters; validation {losses or 'not run'} -> {a['model_dir']}"
        )
    for name in ("baselines", "test"):
        if name in results:
            print(results_markdown(results[name]))
    if "report" in results:
        print(results["report"]["markdown"])


if __name__ == "__main__":
    main()
