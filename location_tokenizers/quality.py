"""How good is a location code table? Collisions, usage, spatial and semantic coherence.

Codes are meant to make nearby and similar places share prefixes. The figures here measure that on
the location table: the mean great-circle distance between locations that share a level-1 code
(and a level-1+2 prefix), and the category purity of level-1+2 groups — the share of a group's
locations that have the group's most common category, averaged over locations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from datamodules.geo import haversine_km


def _mean_pairwise_km(lat: np.ndarray, lon: np.ndarray, groups: np.ndarray, max_group: int = 2000, seed: int = 0) -> float:
    """Mean distance over all pairs inside each group (pairs pooled over groups).

    Groups larger than ``max_group`` are subsampled (uniformly, seeded) to bound the cost.
    """
    rng = np.random.default_rng(seed)
    total, pairs = 0.0, 0
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        n = members.size
        if n < 2:
            continue
        weight = n * (n - 1) / 2
        if n > max_group:
            members = rng.choice(members, max_group, replace=False)
        d = haversine_km(lat[members, None], lon[members, None], lat[None, members], lon[None, members])
        m = members.size
        mean = d[np.triu_indices(m, 1)].mean()
        total += mean * weight
        pairs += weight
    return float(total / pairs) if pairs else 0.0


def purity(groups: np.ndarray, labels: np.ndarray) -> float:
    """Share of locations whose label is their group's most common one (pooled over groups)."""
    if groups.size == 0:
        return 0.0
    _, label_ids = np.unique(labels, return_inverse=True)
    width = int(label_ids.max()) + 1
    keys, counts = np.unique(groups.astype(np.int64) * width + label_ids, return_counts=True)
    owner = keys // width  # sorted, since keys are
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    return float(np.maximum.reduceat(counts, starts).sum() / groups.size)


def location_arrays(locations: pl.DataFrame, loc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``lat``, ``lon`` and ``category`` (``?`` when unknown) of ``loc_ids``, in their order."""
    table = pl.DataFrame({"loc_id": loc_ids}).join(
        locations.select("loc_id", "lat", "lon", "category"), on="loc_id", how="left", maintain_order="left"
    )
    return table["lat"].to_numpy(), table["lon"].to_numpy(), table["category"].fill_null("?").to_numpy()


def coherence(codes: np.ndarray, locations: pl.DataFrame, loc_ids: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """Quality figures of a code table.

    Args:
        codes: ``(N, L)`` integer codes.
        locations: The location table (``loc_id, lat, lon, category``).
        loc_ids: ``(N,)`` location id of each code row.
        codebook_size: K.

    Returns:
        ``collisions``, ``collision_rate``, ``usage_per_level`` (distinct codes used per level),
        ``usage_share_per_level`` (÷K), ``perplexity_per_level``, ``mean_km_same_l1``,
        ``mean_km_same_l12``, ``mean_km_random`` (all pairs, for scale), ``category_purity_l12``,
        ``category_purity_random`` (the same group sizes with shuffled categories).
    """
    return coherence_arrays(codes, *location_arrays(locations, loc_ids), codebook_size)


def coherence_arrays(codes: np.ndarray, lat: np.ndarray, lon: np.ndarray, cats: np.ndarray, codebook_size: int) -> dict[str, Any]:
    """:func:`coherence` on arrays aligned with ``codes``' rows: numpy only, so it is safe in processes
    forked after Polars started its thread pool (DDP's ``ddp_fork``)."""
    n, levels = codes.shape
    full = np.unique(codes, axis=0).shape[0]
    usage = [int(np.unique(codes[:, level]).size) for level in range(levels)]
    perplexity = []
    for level in range(levels):
        p = np.bincount(codes[:, level], minlength=codebook_size) / n
        p = p[p > 0]
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    l1 = codes[:, 0]
    l12 = codes[:, 0] * codebook_size + codes[:, 1] if levels > 1 else l1
    shuffled = np.random.default_rng(0).permutation(cats)
    return {
        "locations": n,
        "collisions": int(n - full),
        "collision_rate": float((n - full) / n) if n else 0.0,
        "usage_per_level": usage,
        "usage_share_per_level": [u / codebook_size for u in usage],
        "perplexity_per_level": perplexity,
        "mean_km_same_l1": _mean_pairwise_km(lat, lon, l1),
        "mean_km_same_l12": _mean_pairwise_km(lat, lon, l12),
        "mean_km_random": _mean_pairwise_km(lat, lon, np.zeros(n, dtype=np.int64)),
        "category_purity_l12": purity(l12, cats),
        "category_purity_random": purity(l12, shuffled),
    }


def plot_code_map(table: Any, locations: pl.DataFrame, path: Path, title: str):
    """Scatter of locations coloured by level-1 code, plus the level-1 usage histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pl.DataFrame({"loc_id": table.loc_ids, "c0": table.codes[:, 0]}).join(
        locations.select("loc_id", "lat", "lon"), on="loc_id", how="left", maintain_order="left"
    )
    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.4, 1]})
    k = table.codebook_size
    ax_map.scatter(df["lon"], df["lat"], c=df["c0"], cmap="tab20" if k <= 20 else "nipy_spectral", s=4, alpha=0.8, vmin=0, vmax=k - 1)
    ax_map.set_xlabel("longitude")
    ax_map.set_ylabel("latitude")
    ax_map.set_title(f"{title}: locations coloured by level-1 code")
    counts = np.bincount(table.codes[:, 0], minlength=k)
    ax_hist.bar(np.arange(k), counts, width=1.0)
    ax_hist.set_xlabel("level-1 code")
    ax_hist.set_ylabel("locations")
    ax_hist.set_title(f"level-1 usage: {int((counts > 0).sum())}/{k} codes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig
