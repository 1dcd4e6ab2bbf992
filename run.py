"""Entry point of the QT-Mob suite: ``python run.py [experiment=...] [stage=...] [key=value ...]``.

``main()`` is only the Hydra wrapper; ``run(cfg)`` does the work and returns the metrics, so tests
and sweeps call the same code path.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from pipeline.config import STAGES, RunConfig, load_config

log = logging.getLogger("qtmob")

# Where each stage lives (pipeline/<module>.py, function run_<stage>_stage). Imported when it runs, so that
# `python run.py --help` does not load torch.
MODULES = {"data": "data", "tokenizer": "tokenizer", "align": "align", "test": "test", "baselines": "test",
           "predict": "predict", "report": "report"}
# What a stage reads from the stages before it: they run first (reused when their folders match).
NEEDS = {"baselines": ["data"], "predict": [], "report": []}


def plan(stage: str) -> list[str]:
    """The stages that run, in order, for ``stage=...``: the only place that orders them."""
    if stage == "all":
        return list(STAGES)
    if stage in STAGES:
        return list(STAGES[: STAGES.index(stage) + 1])
    return NEEDS[stage] + [stage]


def stage_function(name: str) -> Any:
    return getattr(importlib.import_module(f"pipeline.{MODULES[name]}"), f"run_{name}_stage")


def run(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Validate the whole config, then run the requested stage(s) in order.

    Every config problem (unknown key, wrong type, a value outside its set, a required setting left
    out, a trainer argument Lightning does not know) fails here, before any stage touches a folder.
    ``force=true`` recomputes the stage(s) asked for; the stages they need are reused when they match.

    Returns:
        ``{stage: result}`` for the stage(s) asked for (all four for ``stage=all``).
    """
    config = load_config(cfg)
    names = plan(config.stage)
    if {"tokenizer", "align", "test"} & set(names):
        from pipeline.trainers import check_trainer_args

        check_trainer_args(config)
    from lightning_modules.alignment_module import peak_rss_mb
    from lightning_modules.hardware import release_memory, resident_mb

    asked = set(STAGES) if config.stage == "all" else {config.stage}
    results = {}
    for name in names:
        kwargs = {"force": config.force if name in asked else False} if name in STAGES else {}
        result = stage_function(name)(config, **kwargs)
        if name in asked:
            results[name] = result
        # What a stage leaves is freed before the next one starts, so that peaks do not stack.
        held = resident_mb()
        release_memory()
        log.info("%s: done; resident memory %.0f MB (%.0f MB before the release), peak so far %.0f MB", name, resident_mb(),
                 held, peak_rss_mb())
    return results


def _hydra() -> Any:
    return HydraConfig.get() if HydraConfig.initialized() else None


def name_grid_point(cfg: DictConfig) -> None:
    """In a multirun, give a grid point without an ablation ``variant`` one named after its overrides
    (``objectives=next_only,seed=2``), so that the points of a grid never share a run folder."""
    hc = _hydra()
    if hc is None or hc.mode != RunMode.MULTIRUN or cfg.get("variant"):
        return
    from pipeline.report import point_name

    with open_dict(cfg):
        cfg.variant = point_name(list(hc.overrides.task), hc.job.num)


def write_job_record(cfg: DictConfig | RunConfig, status: str, stages: list[str], error: str | None = None) -> None:
    """``<hydra output dir>/qtmob_job.json``: what this job ran and where (read by ``stage=report``)."""
    from datamodules.artifacts import write_json_atomic
    from pipeline.paths import run_dir
    from pipeline.report import JOB_RECORD

    hc = _hydra()
    if hc is None or str(cfg.stage) == "report":
        return
    write_json_atomic(Path(hc.runtime.output_dir) / JOB_RECORD, {
        "status": status, "error": error, "stage": str(cfg.stage), "stages": stages,
        "run_dir": str(run_dir(cfg)) if isinstance(cfg, RunConfig) else None,
        "variant": cfg.variant if isinstance(cfg, RunConfig) else cfg.get("variant"), "overrides": list(hc.overrides.task),
    })


@hydra.main(config_path="experiments", config_name="run", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra wrapper around :func:`run`; input problems end with a message, not a traceback."""
    from datamodules.config import ConfigError
    from datamodules.errors import DataError
    from lightning_modules.llm import ModelUnavailableError
    from lightning_modules.quiet import quiet_known_noise
    from lightning_modules.results import results_markdown

    quiet_known_noise()
    name_grid_point(cfg)
    config: Any = cfg
    try:
        config = load_config(cfg)
        results = run(config)
    except (ConfigError, DataError, ModelUnavailableError) as exc:
        write_job_record(config, "failed", [], f"{type(exc).__name__}: {exc}")
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except BaseException as exc:  # a crash or Ctrl-C: recorded for the sweep report, then raised as usual
        write_job_record(config, "failed", [], f"{type(exc).__name__}: {exc}")
        raise
    write_job_record(config, "ok", list(results))
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
