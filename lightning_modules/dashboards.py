"""What every stage's TensorBoard dashboard shares: one logger per stage, the run's hyperparameters.

Tags are namespaced by stage (``rqvae/…``, ``align/…``, ``test/…``) so that curves of different
models never share a name. Each stage logs the run's own configuration — not a LightningModule's
constructor arguments, which for the test folder used to be the GRU baseline's — as HPARAMS, together
with its final figures, so the HPARAMS tab compares the runs of a sweep by what was set.
"""

from __future__ import annotations

import inspect

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Config groups that say what a run is (paths and Hydra's own settings say only where it ran).
HPARAM_GROUPS = ("data", "llm", "tokenizer", "objectives", "align", "eval", "trainer")


def flat_hparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's configuration as ``{"align.lr": 0.002, "objectives.tasks": "next,recovery_single", …}``.

    Args:
        config: The resolved configuration as plain containers (``pipeline.config.as_dict``).
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (list, tuple)):
            out[prefix] = ",".join(str(v) for v in value)
        elif value is None:
            out[prefix] = "null"
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    for group in HPARAM_GROUPS:
        if group in config:
            walk(group, config[group])
    for key in ("seed", "run_name", "variant"):
        if key in config:
            walk(key, config[key])
    return out


def tensorboard_logger(save_dir: str | Path, name: str):
    """The TensorBoard logger of one stage (``<save_dir>/<name>/version_N``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(save_dir), name=name, default_hp_metric=False)


def log_run(logger: Any, hparams: dict[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
    """HPARAMS of a finished stage: the run's configuration and its final figures (finite ones)."""
    if logger is None:
        return
    finite = {k: float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
    if "metrics" in inspect.signature(logger.log_hyperparams).parameters:  # TensorBoard: the HPARAMS tab
        logger.log_hyperparams(hparams, metrics=finite or None, step=step)
    else:  # CSV and the like: hparams.yaml, and the figures as metrics rows
        logger.log_hyperparams(hparams)
        if finite:
            logger.log_metrics(finite, step=step)
    logger.save()


__all__ = ["HPARAM_GROUPS", "flat_hparams", "log_run", "tensorboard_logger"]
