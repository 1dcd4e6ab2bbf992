"""The one Trainer and logger factory of the RQ-VAE, the alignment and the GRU baseline.

Every ``trainer.*`` key reaches Lightning. The layout keys (accelerator, devices, strategy, num_nodes)
set the processes of the RQ-VAE and the alignment (the GRU runs in one CPU process); the schedule keys
(max_epochs, max_time, val_check_interval, ...) are the alignment's, as the RQ-VAE's schedule is
``tokenizer.*`` and the GRU's ``eval.gru.*``; any other Lightning argument (``+trainer.profiler=simple``,
``debug=fast`` ...) applies to every Trainer of the run, where the stage leaves it open. A name Lightning
does not know fails before any stage runs (:func:`check_trainer_args`).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

from datamodules.config import ConfigError
from lightning_modules.dashboards import tensorboard_logger
from lightning_modules.distributed import ForkSafeThreads
from lightning_modules.progress import ProgressStyle
from pipeline.config import RunConfig
from pipeline.paths import SCHEDULE_KEYS, extra_trainer_args, run_precision, tb_dir

# The process layout of the RQ-VAE and the alignment (the GRU is small: one CPU process, layout=False).
STAGE_LAYOUT = ("accelerator", "devices", "strategy", "num_nodes")


def is_whole(value: Any) -> bool:
    """An int that is not a bool (YAML's ``true`` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


# Whole-number arguments Lightning takes without checking their type (a string would fail mid-run).
_WHOLE = ("max_epochs", "max_steps", "min_epochs", "min_steps", "accumulate_grad_batches", "log_every_n_steps", "num_nodes")


def check_trainer_args(cfg: RunConfig) -> None:
    """Every ``trainer.*`` key is a Lightning ``Trainer`` argument with a value it takes, checked before any
    stage runs: the names against the signature, then the values by building the alignment's Trainer
    once on one CPU process (``precision: auto`` resolved for this machine)."""
    import lightning as L

    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg.trainer) - known)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]} is not an argument of lightning.Trainer "
                          f"(unknown: {unknown}); see https://lightning.ai/docs/pytorch/stable/common/trainer.html")
    for key in _WHOLE:
        value = cfg.trainer.get(key)
        if value is not None and not is_whole(value):
            raise ConfigError(f"trainer.{key}={value!r} is not a whole number")
    args = {**{k: v for k, v in cfg.trainer.items() if k not in STAGE_LAYOUT}, "precision": run_precision(cfg)}
    quiet = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **args)
    except Exception as exc:  # noqa: BLE001 - whatever Lightning refuses becomes one line
        raise ConfigError(f"trainer: {str(exc).splitlines()[0]}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def make_logger(cfg: RunConfig, name: str):
    """The run's logger for one stage (``logger=tensorboard|csv``), under ``<run folder>/tb`` or ``logger.save_dir``."""
    if cfg.logger.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(tb_dir(cfg)), name=name)

    return tensorboard_logger(tb_dir(cfg), name)


def make_trainer(cfg: RunConfig, stage: str, *, logger: Any, callbacks: list[Any] | None = None,
                 layout: bool = True, quiet: bool = False, **stage_args: Any):
    """A Lightning Trainer for ``stage`` (``rqvae``, ``align``, ``gru ...``: the progress label).

    Args:
        cfg: The run.
        stage: Names the progress lines.
        logger: From :func:`make_logger` (or False).
        callbacks: The stage's own callbacks (progress and fork-safety callbacks are added).
        layout: Use the run's process layout (``trainer.accelerator/devices/strategy/num_nodes``);
            False: one CPU process (the GRU).
        quiet: No progress report (``tokenizer.progress_bar=false``); else the run's ``progress`` style.
        **stage_args: The stage's schedule and settings (``use_distributed_sampler``, the batch limit
            worked out from ``align.train_samples`` and ``trainer.limit_train_batches`` ...); they win
            over the run's extra arguments, which fill in everything the stage leaves open.
    """
    import lightning as L

    style = ProgressStyle("none") if quiet else ProgressStyle.from_mapping(vars(cfg.progress))
    progress = style.trainer_kwargs(stage)
    kwargs: dict[str, Any] = {k: cfg.trainer[k] for k in STAGE_LAYOUT if layout and k in cfg.trainer}
    if not layout:
        kwargs.update(accelerator="cpu", devices=1)
    kwargs.update(logger=logger, enable_model_summary=False, **progress)
    kwargs["callbacks"] = [*(callbacks or []), ForkSafeThreads(), *kwargs.pop("callbacks")]
    kwargs.update(extra_trainer_args(cfg))
    kwargs.update(stage_args)
    return L.Trainer(**kwargs)


def align_schedule(cfg: RunConfig) -> dict[str, Any]:
    """The alignment's share of ``trainer.*`` (epochs, steps, accumulation, clipping, validation cadence)."""
    return {k: cfg.trainer[k] for k in SCHEDULE_KEYS if k in cfg.trainer}


def world_size(cfg: RunConfig) -> int:
    """Training processes of the configured trainer (devices x nodes; 1 for devices=auto)."""
    devices = cfg.trainer.get("devices", 1)
    n = int(devices) if isinstance(devices, int) or str(devices).isdigit() else len(devices) if isinstance(devices, list) else 1
    return max(n, 1) * int(cfg.trainer.get("num_nodes", 1))


def fitted_progress(trainer: Any, last_ckpt: Path) -> tuple[int, int]:
    """``(global_step, epochs)`` of a finished fit. A forked/spawned DDP run trains in child processes
    and hands back only weights and metrics, so its counters are read from its last checkpoint."""
    import torch

    if trainer.global_step == 0 and last_ckpt.is_file():
        ckpt = torch.load(last_ckpt, map_location="cpu", weights_only=True)
        return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)) + 1
    return int(trainer.global_step), int(trainer.current_epoch)
