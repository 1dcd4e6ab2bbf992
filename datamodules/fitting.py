"""One length rule for training and test: an over-long prompt loses its oldest visits first.

A next-location, recovery or translation prompt is a profile, a window of visits and a question;
the answer follows. When the whole sample has more than ``max_length`` tokens, the window's start
moves forward (the oldest visits go) and the sample is rendered again, until it fits. A recovery
window cannot start after its (last) masked visit; if it still does not fit, it loses its newest
visits after the mask. The profile, the question and the answer are never cut, and the same rule
runs on training, validation and test samples, so the model is tested on the kind of prompt it was
trained on.

Token counts come from the caller (the LLM's tokenizer), so this module needs no model. A sample
that does not fit even with one visit left (or a task without visits: the token-semantic ones) is
left as it is; the encoder's last-resort cut handles it and counts it separately.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl

# Tasks whose prompt holds a window of visits that may shrink from the start.
HISTORY_TASKS = ("next", "recovery_multi", "recovery_single", "translation")
# First-round guess of tokens per visit sentence (SmolLM2 spends ~36); later rounds use the tokens
# each sample actually lost per dropped visit. Guessing high would cut more visits than needed.
_FIRST_GUESS = 48


def _bounds(index: pl.DataFrame) -> pl.DataFrame:
    """Per sample, the latest window start and the earliest window end that keep it meaningful: one
    visit before a next-location target (whose end is the target), the masked target of a single
    recovery, the first and last masks of a multi recovery, one visit of a translation."""
    first_mask = pl.col("masked").list.min().fill_null(pl.col("end") - 1)
    last_mask = pl.col("masked").list.max().fill_null(pl.col("end") - 1)
    task = pl.col("task")
    return index.select(
        latest=pl.when(task == "recovery_single").then(pl.col("target_pos"))
        .when(task == "recovery_multi").then(first_mask)
        .otherwise(pl.col("end") - 1),
        earliest_end=pl.when(task == "recovery_single").then(pl.col("target_pos") + 1)
        .when(task == "recovery_multi").then(last_mask + 1)
        .otherwise(pl.col("end")),
    )


def fit_history(
    index: pl.DataFrame,
    samples: pl.DataFrame,
    render: Callable[[pl.DataFrame], pl.DataFrame],
    lengths: Callable[[pl.DataFrame], np.ndarray],
    max_length: int,
    max_rounds: int = 16,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Drop the oldest visits of over-long samples until they fit in ``max_length`` tokens.

    Args:
        index: The sample index the samples were rendered from (``sample_id`` = row number in it).
        samples: The rendered samples (any subset of ``index``'s rows, any order).
        render: Renders a sample index (its ``sample_id`` = row number in what it is given).
        lengths: Tokens (prompt + answer) of each rendered sample, in row order.
        max_length: The limit.
        max_rounds: Re-render rounds at most (each round re-renders only the samples still too long).

    Returns:
        The samples in the same order, over-long ones re-rendered with shorter windows, and
        ``{task: samples whose history was cut}`` for every task present.
    """
    tasks = samples["task"].unique(maintain_order=True).to_list()
    cut = {t: 0 for t in tasks}
    if samples.is_empty():
        return samples, cut
    ids = samples["sample_id"].to_numpy().astype(np.int64)
    n_tok = np.asarray(lengths(samples), dtype=np.int64)
    # Token-semantic rows have no window (nulls): 0 marks them as having nothing to drop.
    bounds = _bounds(index).fill_null(0)
    start = index["start"].fill_null(0).to_numpy().astype(np.int64).copy()
    end = index["end"].fill_null(0).to_numpy().astype(np.int64).copy()
    latest = bounds["latest"].to_numpy().astype(np.int64)
    earliest_end = bounds["earliest_end"].to_numpy().astype(np.int64)
    task_of = index["task"].to_numpy()
    per_visit = np.full(index.height, float(_FIRST_GUESS))
    was_cut = np.zeros(index.height, dtype=bool)
    by_id = dict(zip(ids.tolist(), range(len(ids))))
    replaced: dict[int, dict] = {}
    for _ in range(max_rounds):
        over = ids[n_tok > max_length]
        over = over[np.isin(task_of[over], HISTORY_TASKS) & ((start[over] < latest[over]) | (end[over] > earliest_end[over]))]
        if over.size == 0:
            break
        excess = n_tok[[by_id[i] for i in over.tolist()]] - max_length
        drop = np.maximum(1, np.ceil(excess / per_visit[over]).astype(np.int64))
        # The oldest visits first; what the start cannot give, the newest visits after a recovery mask give.
        from_start = np.minimum(drop, latest[over] - start[over])
        from_end = np.minimum(drop - from_start, end[over] - earliest_end[over])
        dropped = from_start + from_end
        start[over] += from_start
        end[over] -= from_end
        was_cut[over] = True
        sub = index[over.tolist()].with_columns(start=pl.Series(start[over].astype(np.int32)), end=pl.Series(end[over].astype(np.int32)))
        again = render(sub)
        new_len = np.asarray(lengths(again), dtype=np.int64)
        for k, (sid, row) in enumerate(zip(again["sample_id"].to_list(), again.iter_rows(named=True))):
            original = int(over[sid])
            pos = by_id[original]
            lost = n_tok[pos] - new_len[k]
            if lost > 0:
                per_visit[original] = max(lost / max(int(dropped[sid]), 1), 1.0)
            n_tok[pos] = new_len[k]
            replaced[original] = {**row, "sample_id": original}
    for i in np.flatnonzero(was_cut):
        cut[str(task_of[i])] = cut.get(str(task_of[i]), 0) + 1
    if not replaced:
        return samples, cut
    fresh = pl.DataFrame(list(replaced.values()), schema=samples.schema)
    keep = samples.with_row_index("_order")
    updated = keep.filter(pl.col("sample_id").is_in(list(replaced))).select("_order", "sample_id").join(
        fresh, on="sample_id", how="left"
    )
    out = pl.concat([keep.filter(~pl.col("sample_id").is_in(list(replaced))), updated.select(keep.columns)])
    return out.sort("_order").drop("_order"), cut


__all__ = ["HISTORY_TASKS", "fit_history"]
