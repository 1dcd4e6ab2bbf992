"""Known noise of the stack, filtered once at start-up (``run.py`` calls :func:`quiet_known_noise`).

Each filter names one message that the pinned stack prints on every run although nothing is wrong
and nothing can be done about it from this suite. A new or unexpected warning still shows.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

# Lightning's per-Trainer notices (three Trainers a run: RQ-VAE, alignment, GRU): facts about a CPU
# machine or advertisements, not about the run.
_LIGHTNING_INFO = re.compile(
    r"^(GPU available|TPU available|HPU available|💡 Tip|Loading `train_dataloader`|`Trainer.fit` stopped"
    # "Trainer(limit_val_batches=1.0) was configured so 100% of the batches will be used": the stages
    # pass the configured value, which may equal Lightning's default.
    r"|`Trainer\(\w+=[^)]*\)` was configured so)"
)


# transformers explains mean_resizing on every resize; the suite chooses it (align.mean_resizing).
_TRANSFORMERS_INFO = re.compile(r"^The new embeddings will be initialized from a multivariate normal")


class _Drop(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def _drop(logger_name: str, pattern: re.Pattern[str]) -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _Drop) and f.pattern is pattern for f in logger.filters):
        logger.addFilter(_Drop(pattern))


def quiet_known_noise() -> None:
    """Install the filters (idempotent)."""
    # Lightning sees `srun` on PATH (the local SLURM of the sweeps) and hints at using it; sweeps go
    # through Hydra's submitit launcher, which sets up the SLURM environment itself.
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system but is not used.*")
    # lightning 2.6's pytree helper on torch 2.13: a deprecation inside Lightning, printed per fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # transformers 5 renamed is_gradient_checkpointing; peft 0.21 still calls the old name.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*`is_gradient_checkpointing` is deprecated.*")
    # bitsandbytes (imported by peft even with align.quantization=none) warns that its CPU kernels
    # package is absent; 4-bit on a CPU is measured and chosen per config, not silently used.
    warnings.filterwarnings("ignore", message=r".*bitsandbytes.*kernels.*")
    # Lightning suggests a distributed sampler / more workers for loaders that the suite sizes itself.
    warnings.filterwarnings("ignore", message=r".*does not have many workers which may be a bottleneck.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _drop(name, _LIGHTNING_INFO)
    _drop("transformers.modeling_utils", _TRANSFORMERS_INFO)
    if not sys.stderr.isatty():
        # In a log file, the tqdm bars of weight loading and GGUF conversion are carriage-return soup.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


__all__ = ["quiet_known_noise"]
