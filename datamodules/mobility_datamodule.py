"""The LightningDataModule of the suite.

It serves two things from the data stage's artefacts:

* the **location table** (``loc_id``, facts, descriptions) for the tokenizer stage;
* the **mixed-task instruction samples** (one Polars table with a ``task`` column) for
  alignment, rendered with the location codes and drawn by :class:`TaskMixtureSampler` with the
  configured task weights.

Collation (tokenisation, padding, label masking) belongs to the model that consumes the samples,
so it is passed in as ``collate_fn``; without one a batch is a list of sample dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.config import SampleConfig
from datamodules.errors import DataError
from datamodules.fitting import fit_history
from datamodules.rendering import sample_renderer
from datamodules.samples import TASKS

log = logging.getLogger(__name__)


class SampleDataset(Dataset):
    """Rendered samples as a map-style dataset of dicts (``task``, ``prompt``, ``response_prefix``, ...)."""

    def __init__(self, samples: pl.DataFrame) -> None:
        self.samples = samples
        self._rows = samples.to_dicts()

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._rows[i]


class TaskMixtureSampler(Sampler[int]):
    """Draws sample indices with per-task sampling weights, reshuffled every epoch.

    With ``weights=None`` every sample is drawn once per epoch in random order — the paper's
    shuffled concatenation, i.e. the natural task proportions. With weights, each draw first picks
    a task by weight, then the next sample of that task (each task cycles through its own shuffled
    order), for ``num_samples`` draws per epoch.

    Args:
        tasks: The task of every sample.
        weights: ``{task: weight}``; tasks missing from it get weight 0.
        num_samples: Draws per epoch (default: the number of samples).
        seed: Base seed; the epoch is added, so epochs differ but runs repeat.
    """

    def __init__(
        self, tasks: Sequence[str], weights: dict[str, float] | None = None, num_samples: int | None = None, seed: int = 0
    ) -> None:
        self.tasks = np.asarray(tasks)
        self.weights = weights
        self.num_samples = len(self.tasks) if num_samples is None else int(num_samples)
        self.seed = seed
        self.epoch = 0
        if weights is not None:
            names = sorted(set(self.tasks.tolist()))
            w = np.array([float(weights.get(t, 0.0)) for t in names])
            if (w < 0).any() or w.sum() <= 0:
                raise DataError(f"objectives.weights must be non-negative with a positive sum, got {weights}")
            self._names, self._p = names, w / w.sum()
            self._members = [np.flatnonzero(self.tasks == t) for t in names]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed + self.epoch)
        if self.weights is None:
            yield from rng.permutation(len(self.tasks))[: self.num_samples].tolist()
            return
        choice = rng.choice(len(self._names), size=self.num_samples, p=self._p)
        orders = [rng.permutation(m) for m in self._members]
        cursor = [0] * len(orders)
        for t in choice.tolist():
            order = orders[t]
            yield int(order[cursor[t] % len(order)])
            cursor[t] += 1


class EncodedDataset(Dataset):
    """Tokenised samples: item ``i`` is ``(ids, prompt_len, i, task, label mask or None, hint mask or None)`` for
    a :class:`ChatEncoder` collate (the masks only for whole-trajectory samples)."""

    def __init__(self, encoded: Any) -> None:
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int, str, np.ndarray | None, np.ndarray | None]:
        ids, plen = self.encoded.sample(i)
        return ids, plen, i, str(self.encoded.task[i]), self.encoded.label_mask(i), self.encoded.hint_mask(i)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, so that padding stays small, in an order that is still random.

    Each epoch takes the index order of ``sampler`` (e.g. the task mixture), cuts it into groups of
    ``group_batches`` batches, sorts each group by length, splits it into batches and shuffles the
    batches. Task proportions are those of ``sampler``; only the grouping changes.

    With several processes (DDP), each rank takes every ``world_size``-th batch; the batch count is
    rounded down to a multiple of ``world_size`` so that all ranks step together.

    ``skip`` batches at the start of the next epoch are skipped once: used when a run resumes
    from a mid-epoch checkpoint, so that it continues where it stopped instead of re-training the
    epoch's first batches.

    Args:
        sampler: Yields sample indices (``TaskMixtureSampler`` for training, a range for evaluation).
        lengths: Tokens of every sample.
        batch_size: Samples per batch.
        group_batches: Batches per sorting group (larger: less padding, less randomness).
        shuffle: Shuffle the batches (training); otherwise batches come longest first.
        seed: Base seed (the epoch is added).
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(
        self, sampler: Sampler[int] | Sequence[int], lengths: np.ndarray, batch_size: int, group_batches: int = 64,
        shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
    ) -> None:
        self.sampler = sampler
        self.lengths = np.asarray(lengths)
        self.batch_size = int(batch_size)
        self.group_batches = int(group_batches)
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; passed on to the index sampler."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _all_batches(self) -> list[list[int]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 7])
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __len__(self) -> int:
        n = -(-len(self.sampler) // self.batch_size)  # ceil; exact except for short groups
        return n // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._all_batches()[self.rank :: self.world_size]
        skip, self.skip = self.skip, 0
        yield from mine[skip:]


class MobilityDataModule(L.LightningDataModule):
    """Location table and mixed-task samples of one dataset.

    Args:
        data_dir: The data stage's folder (``<paths.artifacts>/<data.name>/data``).
        codes: ``loc_id, code`` token strings of every location (needed for samples, not for the
            location table).
        tasks: Tasks to serve (default: all six).
        weights: Task sampling weights for training (None = natural proportions).
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        collate_fn: Turns a list of sample dicts into a batch (the alignment module's tokenizer).
        sample_cfg: Rendering settings (profiles on/off).
        seed: Seed of the training sampler.
        encoder: A :class:`~lightning_modules.chat_encoding.ChatEncoder`. With it, loaders serve
            tokenised samples in length-grouped batches collated by ``encoder.collate``, and samples
            longer than ``encoder.max_length`` lose their oldest visits (:func:`fit_history`).
        eval_per_task: Validation/test samples kept per task (None: all), the first ones of a
            seeded shuffle, so that per-epoch validation stays affordable and always uses the same set.
        group_batches: Batches per length-sorting group (see :class:`LengthGroupedBatchSampler`).
    """

    def __init__(
        self,
        data_dir: str | Path,
        codes: pl.DataFrame | None = None,
        tasks: Sequence[str] | None = None,
        weights: dict[str, float] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None,
        sample_cfg: SampleConfig = SampleConfig(),
        seed: int = 0,
        encoder: Any | None = None,
        eval_per_task: int | None = None,
        group_batches: int = 64,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.codes = codes
        self.tasks = tuple(tasks) if tasks is not None else TASKS
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise DataError(f"unknown tasks {sorted(unknown)}; choose from {list(TASKS)}")
        self.weights = dict(weights) if weights else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn or (lambda batch: batch)
        self.sample_cfg = sample_cfg
        self.seed = seed
        self.encoder = encoder
        self.eval_per_task = eval_per_task
        self.group_batches = group_batches
        self._samples: dict[str, pl.DataFrame] = {}
        self._encoded: dict[str, Any] = {}
        # Per split and task: samples whose oldest visits were cut to fit the encoder's max_length.
        self.cut_history: dict[str, dict[str, int]] = {}
        self.train_batch_sampler: LengthGroupedBatchSampler | None = None
        # Batches of the current epoch already trained before a restart (set when resuming).
        self.resume_skip = 0

    # -- tables -------------------------------------------------------------------------------
    def _read(self, name: str) -> pl.DataFrame:
        path = self.data_dir / name
        if not path.is_file():
            raise DataError(f"{path} not found: run the data stage first (python run.py stage=data ...)")
        return pl.read_parquet(path)

    def setup(self, stage: str | None = None) -> None:
        """Load the data stage's tables (cheap; idempotent)."""
        if hasattr(self, "checkins"):
            return
        self.checkins = self._read("checkins.parquet")
        self.locations = self._read("locations.parquet")
        self.profiles = self._read("profiles.parquet")
        self.index = self._read("sample_index.parquet")

    def location_table(self) -> pl.DataFrame:
        """The location table: ``loc_id``, facts, ``train_visits``, ``description``, ..."""
        self.setup()
        return self.locations

    def samples(self, split: str) -> pl.DataFrame:
        """Rendered samples of one split for the configured tasks (cached)."""
        if split not in self._samples:
            if self.codes is None:
                raise DataError("samples need location codes: pass codes= (run the tokenizer stage first)")
            self.setup()
            index = self.index.filter((pl.col("split") == split) & pl.col("task").is_in(list(self.tasks)))
            render = sample_renderer(self.checkins, self.codes, self.locations, self.profiles, self.sample_cfg)
            samples = render(index)
            if split != "train" and self.eval_per_task is not None:
                samples = (
                    samples.with_columns(_r=pl.int_range(pl.len()).shuffle(seed=self.seed).over("task"))
                    .filter(pl.col("_r") < self.eval_per_task).drop("_r")
                )
            if self.encoder is not None:
                samples, cut = fit_history(index, samples, render, self.encoder.lengths, self.encoder.max_length)
                self.cut_history[split] = cut
                if any(cut.values()):
                    log.info("%s: oldest visits cut to fit max_length=%d tokens in %s samples", split,
                             self.encoder.max_length, {t: n for t, n in cut.items() if n})
            self._samples[split] = samples
        return self._samples[split]

    def encoded(self, split: str) -> Any:
        """Tokenised samples of one split (needs ``encoder``; cached)."""
        if self.encoder is None:
            raise DataError("encoded samples need an encoder (the alignment stage's ChatEncoder)")
        if split not in self._encoded:
            self._encoded[split] = self.encoder.encode(self.samples(split))
        return self._encoded[split]

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (int(trainer.global_rank), int(trainer.world_size)) if trainer is not None else (0, 1)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        samples = self.samples("train")
        sampler = TaskMixtureSampler(samples["task"].to_list(), self.weights, seed=self.seed)
        if self.encoder is not None:
            rank, world = self._rank()
            self.train_batch_sampler = LengthGroupedBatchSampler(
                sampler, self.encoded("train").lengths, self.batch_size, self.group_batches,
                shuffle=True, seed=self.seed, rank=rank, world_size=world,
            )
            # A checkpoint from an epoch's end (skip == the epoch's length) resumes at the next epoch's start.
            self.train_batch_sampler.skip = self.resume_skip if self.resume_skip < len(self.train_batch_sampler) else 0
            return DataLoader(
                EncodedDataset(self.encoded("train")), batch_sampler=self.train_batch_sampler,
                num_workers=self.num_workers, collate_fn=self.encoder.collate,
            )
        return DataLoader(
            SampleDataset(samples), batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, collate_fn=self.collate_fn,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        if self.encoder is not None:
            encoded = self.encoded(split)
            rank, world = self._rank()
            batches = LengthGroupedBatchSampler(
                range(len(encoded)), encoded.lengths, self.batch_size, group_batches=len(encoded) + 1,
                shuffle=False, rank=rank, world_size=world,
            )
            return DataLoader(EncodedDataset(encoded), batch_sampler=batches, num_workers=self.num_workers, collate_fn=self.encoder.collate)
        return DataLoader(
            SampleDataset(self.samples(split)), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def location_dataloader(self, batch_size: int = 64) -> DataLoader:
        """Location descriptions in ``loc_id`` order, for embedding them in the tokenizer stage."""
        table = self.location_table().select("loc_id", "description")
        return DataLoader(SampleDataset(table), batch_size=batch_size, shuffle=False, collate_fn=lambda b: b)


def default_codes(locations: pl.DataFrame) -> pl.DataFrame:
    """One new token per location (``<loc_17>``): the 'ID token' baseline tokenization, also handy
    before an RQ-VAE exists."""
    return locations.select("loc_id", code=pl.format("<loc_{}>", "loc_id"))


__all__ = ["EncodedDataset", "LengthGroupedBatchSampler", "MobilityDataModule", "SampleDataset", "TaskMixtureSampler", "default_codes"]
