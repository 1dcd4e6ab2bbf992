"""The non-semantic tokenizations of the ablation grid (``tokenizer=id`` and ``tokenizer=random``)."""

from __future__ import annotations

import numpy as np

from location_tokenizers.codes import CodeTable


def baseline_table(kind: str, loc_ids: np.ndarray, num_levels: int, codebook_size: int, seed: int) -> CodeTable:
    """The non-semantic tokenizations of the ablation grid.

    * ``id``: one new token per location (a single level whose codebook is the catalogue), as in
      LLM recommenders that add an ID token per item;
    * ``random``: ``num_levels x codebook_size`` codes drawn uniformly without collisions (seeded):
      the RQ-VAE's shape with none of its semantics, so shared prefixes mean nothing.
    """
    n = len(loc_ids)
    if kind == "id":
        return CodeTable(loc_ids=loc_ids, codes=np.arange(n, dtype=np.int64)[:, None], codebook_size=max(n, 1))
    levels, k = num_levels, codebook_size
    if k**levels < n:
        raise ValueError(f"tokenizer=random: {levels} levels x {k} codes give {k**levels} codes for {n} locations")
    rng = np.random.default_rng(seed)
    flat: np.ndarray = np.empty(0, dtype=np.int64)
    while len(flat) < n:  # rejection of duplicates; K**L is far above n in practice
        draw = rng.integers(0, k**levels, size=2 * (n - len(flat)), dtype=np.int64)
        flat = np.concatenate([flat, draw])
        _, first = np.unique(flat, return_index=True)
        flat = flat[np.sort(first)]
    flat = flat[:n]
    codes = np.stack([(flat // k ** (levels - 1 - lv)) % k for lv in range(levels)], axis=1)
    return CodeTable(loc_ids=loc_ids, codes=codes, codebook_size=k)
