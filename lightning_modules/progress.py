"""Progress that a log file can show: one style, chosen on purpose.

Lightning picks ``RichProgressBar`` whenever ``rich`` is importable, and Rich writes nothing to a file
or a pipe until the stage ends: a SLURM log of a 16-minute alignment stayed empty until its last line.
So every long loop here reports through :class:`ProgressStyle`:

* in a terminal (stderr is a TTY), a live ``tqdm`` bar — Lightning's ``TQDMProgressBar`` for fits,
  ``tqdm`` for the test loop (``tqdm`` is pinned in ``requirements.txt``);
* otherwise (a log file, SLURM, a pipe), a line every ``every_seconds`` seconds (and/or every
  ``every_steps`` steps) with the step, the loss, the throughput, the elapsed time and an ETA, through
  the ``qtmob.progress`` logger, so the lines land in Hydra's job log as well;
* ``none``: silent.

Configured by the ``progress`` node of ``experiments/run.yaml`` (``style: auto|bar|lines|none``).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar, TQDMProgressBar

log = logging.getLogger("qtmob.progress")

STYLES = ("auto", "bar", "lines", "none")


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Clock:
    """When the next line is due: every ``every_seconds`` seconds and/or every ``every_steps`` steps."""

    def __init__(self, every_seconds: float, every_steps: int) -> None:
        self.every_seconds, self.every_steps = float(every_seconds), int(every_steps)
        self.start = self.last = time.perf_counter()

    def due(self, step: int) -> bool:
        now = time.perf_counter()
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        by_time = self.every_seconds > 0 and now - self.last >= self.every_seconds
        if by_steps or by_time:
            self.last = now
            return True
        return False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _eta(done: float, total: float, elapsed: float) -> str:
    if done <= 0 or not math.isfinite(total) or total <= 0:
        return "?"
    return duration(elapsed * (total - done) / done)


class LineProgress(ProgressBar):
    """Lightning progress as log lines (for non-TTY output).

    A line looks like ``[align] step 8/16 (50%) · epoch 1/1 · loss 3.214 · tokens/s 81 · 1m40s elapsed · ETA 1m40s``;
    after each validation, a line with the validation figures; at the end, a summary.

    Args:
        name: The stage, shown in brackets.
        every_seconds: Seconds between two lines (0: only by steps).
        every_steps: Optimizer steps between two lines (0: only by time).
        show: Logged metrics shown in a line, matched by the part after the last ``/`` (``loss``
            matches ``align/train/loss``).
    """

    def __init__(self, name: str, every_seconds: float = 30.0, every_steps: int = 0,
                 show: tuple[str, ...] = ("loss", "train_loss", "tokens_per_s", "recon", "usage_l0")) -> None:
        super().__init__()
        self.name, self.show = name, show
        self.every_seconds, self.every_steps = every_seconds, every_steps
        self._enabled = True
        self._clock = _Clock(every_seconds, every_steps)
        self._last_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _figures(self, trainer: L.Trainer, prefix: str) -> str:
        parts = []
        for key, value in sorted(trainer.callback_metrics.items()):
            leaf, is_val = key.rsplit("/", 1)[-1], "val/" in key or key.startswith("val")
            wanted = leaf in ("loss", "acc@1", "ndcg@5", "cases") if prefix == "val" else leaf in self.show
            if wanted and is_val == (prefix == "val"):
                try:
                    parts.append(f"{key} {float(value):.4g}")
                except (TypeError, ValueError):
                    continue
        return " · ".join(parts)

    def _total_steps(self, trainer: L.Trainer) -> float:
        total = trainer.estimated_stepping_batches
        return float(total) if total is not None else math.inf

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = _Clock(self.every_seconds, self.every_steps)
        if self._enabled and trainer.is_global_zero:
            total = self._total_steps(trainer)
            log.info("[%s] training: %s steps, %s epochs", self.name, "?" if not math.isfinite(total) else int(total),
                     trainer.max_epochs if trainer.max_steps in (-1, None) else "<=" + str(trainer.max_epochs))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not (self._enabled and trainer.is_global_zero) or step == self._last_step or not self._clock.due(step):
            return
        self._last_step = step
        total, elapsed = self._total_steps(trainer), self._clock.elapsed()
        share = f" ({100 * step / total:.0f}%)" if math.isfinite(total) and total > 0 else ""
        figures = self._figures(trainer, "train")
        log.info("[%s] step %d/%s%s · epoch %d/%s%s · %s elapsed · ETA %s", self.name, step,
                 int(total) if math.isfinite(total) else "?", share, trainer.current_epoch + 1, trainer.max_epochs,
                 f" · {figures}" if figures else "", duration(elapsed), _eta(step, total, elapsed))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            figures = self._figures(trainer, "val")
            if figures:
                log.info("[%s] validation at step %d: %s", self.name, trainer.global_step, figures)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            log.info("[%s] training done: %d steps in %s", self.name, trainer.global_step, duration(self._clock.elapsed()))


class LoopProgress:
    """Progress of a plain loop (the test stage's cases): a tqdm bar or log lines.

    Use as a context manager; ``update(n)`` after each chunk of ``n`` items.
    """

    def __init__(self, name: str, total: int, unit: str, style: str, every_seconds: float, every_steps: int) -> None:
        self.name, self.total, self.unit = name, int(total), unit
        self.style, self.done = style, 0
        self._clock = _Clock(every_seconds, every_steps)
        self._bar = None

    def __enter__(self) -> LoopProgress:
        if self.style == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.name, unit=self.unit, dynamic_ncols=True)
        elif self.style == "lines":
            log.info("[%s] %d %s", self.name, self.total, self.unit)
        return self

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.style == "lines" and self._clock.due(self.done):
            elapsed = self._clock.elapsed()
            log.info("[%s] %d/%d %s (%.0f%%) · %.2f %s/s · %s elapsed · ETA %s", self.name, self.done, self.total, self.unit,
                     100 * self.done / max(self.total, 1), self.done / max(elapsed, 1e-9), self.unit, duration(elapsed),
                     _eta(self.done, self.total, elapsed))

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.style == "lines" and exc[0] is None:
            log.info("[%s] %d %s in %s", self.name, self.done, self.unit, duration(self._clock.elapsed()))


@dataclass(frozen=True)
class ProgressStyle:
    """How long loops report (the ``progress`` config node).

    Args:
        style: ``auto`` (a bar in a terminal, lines otherwise), ``bar``, ``lines`` or ``none``.
        every_seconds: Seconds between two lines.
        every_steps: Steps (or items of a loop) between two lines; 0 = by time only.
    """

    style: str = "auto"
    every_seconds: float = 30.0
    every_steps: int = 0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"progress.style={self.style!r}; choose from {list(STYLES)}")

    def resolved(self) -> str:
        """``bar``, ``lines`` or ``none`` for this process (``auto``: a bar only when stderr is a terminal)."""
        if self.style != "auto":
            return self.style
        return "bar" if sys.stderr.isatty() else "lines"

    def callback(self, name: str) -> ProgressBar | None:
        """The Lightning progress callback of a fit (None: pass ``enable_progress_bar=False``)."""
        style = self.resolved()
        if style == "bar":
            return TQDMProgressBar()
        if style == "lines":
            return LineProgress(name, self.every_seconds, self.every_steps)
        return None

    def trainer_kwargs(self, name: str) -> dict[str, Any]:
        """``callbacks``/``enable_progress_bar`` arguments of a Trainer (merge ``callbacks`` with yours)."""
        bar = self.callback(name)
        return {"callbacks": [bar]} if bar is not None else {"callbacks": [], "enable_progress_bar": False}

    def loop(self, name: str, total: int, unit: str) -> LoopProgress:
        return LoopProgress(name, total, unit, self.resolved(), self.every_seconds, self.every_steps)

    @classmethod
    def from_mapping(cls, node: Any) -> ProgressStyle:
        """From the ``progress`` config node (any mapping; missing keys take the defaults)."""
        if node is None:
            return cls()
        get = node.get if hasattr(node, "get") else lambda k, d=None: getattr(node, k, d)
        return cls(style=str(get("style", "auto")), every_seconds=float(get("every_seconds", 30.0)),
                   every_steps=int(get("every_steps", 0)))


__all__ = ["LineProgress", "LoopProgress", "ProgressStyle", "STYLES", "duration"]
