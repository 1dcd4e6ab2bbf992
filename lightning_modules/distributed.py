"""Multi-process training on CPUs.

``trainer.strategy=ddp_fork`` forks the training processes from the running one at ``fit``. GNU OpenMP
(PyTorch's CPU thread pool) does not survive a fork: a child that enters a multi-threaded region
waits forever on the parent's threads. Each forked process therefore runs its own ops single-threaded,
which on an N-core machine with N processes is the layout one wants anyway.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class ForkSafeThreads(Callback):
    """One intra-op thread per process in forked multi-process runs (no-op otherwise)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.world_size > 1 and getattr(trainer.strategy, "_start_method", None) == "fork":
            torch.set_num_threads(1)
            log.info("rank %d: forked process, 1 intra-op thread", trainer.global_rank)


__all__ = ["ForkSafeThreads"]
