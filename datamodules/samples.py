"""QT-Mob's instruction samples as pure Polars functions.

Two steps, so that sample *structure* does not depend on the location codes:

1. :func:`build_sample_index` decides which samples exist — which trajectory, which visits are
   history, which positions are masked, which template — as plain columns. It needs no
   tokenizer, so the data stage can count and store it.
2. :func:`datamodules.rendering.render_samples` turns the index into text once the codes are known
   (RQ-VAE tokens, the released index, or one token per location), vectorised over all samples, with
   the wordings of :mod:`datamodules.prompts`.

Tasks (design.md §1): ``next`` (next-location), ``recovery_multi`` and ``recovery_single``
(trajectory recovery), ``index2loc`` and ``loc2index`` (token semantics), ``translation``.
Every sample is ``prompt`` (the user turn) + ``response_prefix`` + ``target`` (the assistant turn);
the loss covers the assistant turn, and constrained decoding starts after ``response_prefix``.
"""

from __future__ import annotations


import numpy as np
import polars as pl

from datamodules.config import SampleConfig
from datamodules.prompts import TEMPLATES

TASKS = ("next", "recovery_multi", "recovery_single", "index2loc", "loc2index", "translation")

INDEX_SCHEMA = {
    "task": pl.String(), "split": pl.String(), "traj_id": pl.String(), "user_id": pl.String(),
    "start": pl.Int32(), "end": pl.Int32(), "target_pos": pl.Int32(), "masked": pl.List(pl.Int32()),
    "loc_id": pl.Int64(), "template": pl.Int8(), "is_last": pl.Boolean(),
}


def add_positions(visits: pl.DataFrame) -> pl.DataFrame:
    """Number visits within each trajectory in time order (``pos``) and add its length (``traj_len``).

    Args:
        visits: Check-ins with ``traj_id``, ``split``, ``utc_time``; any order.
    """
    return visits.sort("traj_id", "utc_time", maintain_order=True).with_columns(
        pos=pl.int_range(pl.len(), dtype=pl.Int32).over("traj_id"),
        traj_len=pl.len().over("traj_id").cast(pl.Int32),
    )


def _trajectories(visits: pl.DataFrame) -> pl.DataFrame:
    """One row per trajectory, in a stable order (split, numeric trajectory id)."""
    order = pl.col("split").replace_strict({"train": 0, "valid": 1, "test": 2}, default=3, return_dtype=pl.Int8)
    num = pl.col("traj_id").str.extract(r"(\d+)$").cast(pl.Int64, strict=False)
    return (
        visits.group_by("traj_id")
        .agg(pl.col("split").first(), pl.col("user_id").first(), L=pl.len().cast(pl.Int32))
        .sort(order, num, "traj_id")
    )


def _templates(n: int, task: str, split: str, cfg: SampleConfig, rng: np.random.Generator) -> pl.Series:
    k = len(TEMPLATES[task])
    if split == "test" or not cfg.random_templates or k == 1:
        return pl.Series("template", np.zeros(n, dtype=np.int8))
    drawn = rng.integers(0, k, size=n).astype(np.int8)
    # Drawn even when unused, so that the masks drawn after it do not depend on this switch.
    if task == "next" and not cfg.next_paraphrases:
        drawn[:] = 0
    return pl.Series("template", drawn)


def _draw_masks(trajs: pl.DataFrame, cfg: SampleConfig, rng: np.random.Generator) -> pl.DataFrame:
    """Mask 20–50 % of positions 1..L-1 of the first ``recovery_max_len`` visits, vectorised.

    The number of masks k is uniform in [max(1, int(lo·L)), max(1, int(hi·L))]; the positions are
    the k smallest of i.i.d. uniform keys, i.e. a uniform k-subset. Position 0 is never masked, so
    every masked trajectory keeps a visible anchor.
    """
    lh = np.minimum(trajs["L"].to_numpy(), cfg.recovery_max_len).astype(np.int64)
    lo = np.maximum(1, (cfg.mask_ratio[0] * lh).astype(np.int64))
    hi = np.maximum(lo, np.maximum(1, (cfg.mask_ratio[1] * lh).astype(np.int64)))
    k = lo + np.floor(rng.random(lh.size) * (hi - lo + 1)).astype(np.int64)
    n_cand = lh - 1
    owner = np.repeat(np.arange(lh.size), n_cand)
    pos = (np.arange(owner.size) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand) + 1).astype(np.int32)
    keys = rng.random(owner.size)
    order = np.lexsort((keys, owner))
    rank = np.empty(owner.size, dtype=np.int64)
    rank[order] = np.arange(owner.size) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand)
    keep = rank < k[owner]
    # Masked positions of each trajectory, in draw order (the order single samples are emitted).
    picked = pl.DataFrame({"row": owner[keep], "rank": rank[keep], "pos": pos[keep]}).sort("row", "rank")
    masks = picked.group_by("row", maintain_order=True).agg(masked=pl.col("pos"))
    return (
        trajs.with_row_index("row")
        .with_columns(pl.col("row").cast(pl.Int64), end=pl.Series(lh.astype(np.int32)))
        .join(masks.with_columns(pl.col("row").cast(pl.Int64)), on="row", how="left")
        .drop("row")
    )


def _trajectory_chunks(tr: pl.DataFrame, cfg: SampleConfig) -> pl.DataFrame:
    """Whole-trajectory next-location samples: windows of at most ``max_history + 1`` visits whose
    ``masked`` lists the targets (positions >= ``min_history``), each target in exactly one window with
    at most ``max_history`` visits before it there, as in its per-prefix sample."""
    width, step = cfg.max_history + 1, max(cfg.max_history + 1 - cfg.min_history, 1)
    chunks = (
        tr.filter(pl.col("L") > cfg.min_history)
        .with_columns(start=pl.int_ranges(0, pl.col("L") - cfg.min_history, step, dtype=pl.Int32))
        .explode("start")
        .with_columns(end=pl.min_horizontal(pl.col("start") + width, pl.col("L")).cast(pl.Int32))
    )
    # Targets of a chunk: from start + min_history (= the previous chunk's end) to its end.
    first = (pl.col("start") + cfg.min_history).cast(pl.Int32)
    return chunks.with_columns(
        masked=pl.int_ranges(first, pl.col("end"), dtype=pl.Int32), target_pos=first,
        is_last=pl.col("end") == pl.col("L"),
    ).filter(pl.col("masked").list.len() > 0)


def build_sample_index(
    visits: pl.DataFrame, loc_ids: pl.Series | None, cfg: SampleConfig, tasks: tuple[str, ...] = TASKS
) -> pl.DataFrame:
    """Decide every sample of every task and split (no text yet).

    Args:
        visits: Check-ins with ``traj_id``, ``split``, ``user_id``, ``utc_time``.
        loc_ids: Locations with a description (for ``index2loc``/``loc2index``); None skips them.
        cfg: Sample settings.
        tasks: Which tasks to build.

    Returns:
        A frame with :data:`INDEX_SCHEMA`: per sample its task, split, trajectory, visit window
        ``[start, end)``, target position, masked positions and template. Next-location: every
        target position ≥ ``min_history`` of train/valid trajectories (the last visit only in
        test), history = up to ``max_history`` preceding visits; with ``next_format=trajectory``
        the train split has one row per trajectory chunk instead, ``masked`` = its targets. Recovery: the first
        ``recovery_max_len`` visits; ``recovery_multi`` in train/valid, ``recovery_single`` in
        every split. Token-semantic tasks: train only, one sample per described location.
        Translation: train/valid, one per trajectory.
    """
    rng = np.random.default_rng(cfg.seed)
    trajs = _trajectories(visits)
    frames: list[pl.DataFrame] = []

    def emit(df: pl.DataFrame, task: str, split: str, replace: pl.DataFrame | None = None) -> None:
        templates = _templates(df.height, task, split, cfg, rng)  # drawn even if replaced: later masks stay the same
        if replace is not None:
            df, templates = replace, pl.Series("template", np.zeros(replace.height, dtype=np.int8))
        df = df.with_columns(task=pl.lit(task), split=pl.lit(split), template=templates)
        frames.append(df.select([pl.col(c).cast(t) if c in df.columns else pl.lit(None, t).alias(c) for c, t in INDEX_SCHEMA.items()]))

    for split in ("train", "valid", "test"):
        tr = trajs.filter(pl.col("split") == split)
        if tr.height == 0:
            continue
        if "next" in tasks:
            if split == "test":
                nxt = tr.filter(pl.col("L") > cfg.min_history).with_columns(target_pos=pl.col("L") - 1)
            else:
                nxt = (
                    tr.filter(pl.col("L") > cfg.min_history)
                    .with_columns(target_pos=pl.int_ranges(cfg.min_history, pl.col("L"), dtype=pl.Int32))
                    .explode("target_pos")
                )
            nxt = nxt.with_columns(
                start=pl.max_horizontal(pl.col("target_pos") - cfg.max_history, 0),
                end=pl.col("target_pos"),
                is_last=pl.col("target_pos") == pl.col("L") - 1,
            )
            whole = split == "train" and cfg.next_format == "trajectory"
            emit(nxt, "next", split, _trajectory_chunks(tr, cfg) if whole else None)
        recovery = tr.filter(pl.col("L") >= 2)
        if "recovery_multi" in tasks and split != "test":
            emit(_draw_masks(recovery, cfg, rng).with_columns(start=pl.lit(0)), "recovery_multi", split)
        if "recovery_single" in tasks:
            single = (
                _draw_masks(recovery, cfg, rng)
                .with_columns(start=pl.lit(0), target_pos=pl.col("masked"))
                .explode("target_pos")
            )
            emit(single, "recovery_single", split)
        if "translation" in tasks and split != "test":
            emit(tr.with_columns(start=pl.lit(0), end=pl.min_horizontal("L", cfg.recovery_max_len)), "translation", split)
        if split == "train" and loc_ids is not None:
            locs = pl.DataFrame({"loc_id": loc_ids.sort()})
            for task in ("index2loc", "loc2index"):
                if task in tasks:
                    emit(locs, task, split)
    if not frames:
        return pl.DataFrame(schema=INDEX_SCHEMA)
    return pl.concat(frames)


def count_samples(index: pl.DataFrame) -> dict[str, dict[str, int]]:
    """``{task: {split: n}}`` of a sample index."""
    out: dict[str, dict[str, int]] = {}
    for task, split, n in index.group_by("task", "split").len().sort("task", "split").iter_rows():
        out.setdefault(task, {})[split] = n
    return out
