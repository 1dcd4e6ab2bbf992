"""Tests for the collision-free code assignment (``location_tokenizers.assign``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from location_tokenizers.assign import assign_codes, count_collisions
from location_tokenizers.quantizer import ResidualQuantizer

DIM = 6


def random_quantizer(levels: int, size: int, seed: int, dim: int = DIM) -> ResidualQuantizer:
    """A quantizer with seeded, unit-scale random codebooks (no training)."""
    q = ResidualQuantizer(levels, size, dim)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.codebooks.copy_(torch.randn(levels, size, dim, generator=g))
    return q


def hierarchical_quantizer(levels: int, size: int, seed: int) -> ResidualQuantizer:
    """Random codebooks whose scale shrinks 20x per level, so that greedy quantisation of a sum of
    one codeword per level recovers exactly those codewords."""
    q = random_quantizer(levels, size, seed)
    with torch.no_grad():
        q.codebooks.mul_(torch.tensor([0.05**level for level in range(levels)])[:, None, None])
    return q


def duplicated_latents(n: int, distinct: int, seed: int, dim: int = DIM) -> torch.Tensor:
    """``n`` latents drawn (with repeats) from ``distinct`` random rows: many identical locations."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(distinct, dim))
    return torch.from_numpy(base[rng.integers(distinct, size=n)]).float()


def assert_valid(codes: np.ndarray, n: int, levels: int, size: int) -> None:
    assert codes.shape == (n, levels) and codes.dtype == np.int64
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) < size
    assert np.unique(codes, axis=0).shape[0] == n


def assert_unique_codes_kept(latents: torch.Tensor, q: ResidualQuantizer, codes: np.ndarray) -> None:
    """Locations with a unique step-(a) code keep it (always, by construction of the repair)."""
    nearest = q.encode_codes(latents).numpy()
    _, inverse, counts = np.unique(nearest, axis=0, return_inverse=True, return_counts=True)
    unique = counts[inverse.reshape(-1)] == 1
    assert np.array_equal(codes[unique], nearest[unique])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_unique_codes_in_range(data: st.DataObject) -> None:
    levels = data.draw(st.sampled_from([2, 3]), label="L")
    size = data.draw(st.integers(2, 8), label="K")
    n = data.draw(st.integers(1, min(size**levels, 120)), label="N")
    distinct = data.draw(st.integers(1, n), label="distinct rows")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    kmeans = data.draw(st.booleans(), label="kmeans_init")
    rounds = data.draw(st.sampled_from([0, 1, 5]), label="sinkhorn_rounds")
    q = random_quantizer(levels, size, seed)
    latents = duplicated_latents(n, distinct, seed)
    if kmeans:
        q.kmeans_init(latents, iters=5, seed=seed)
    codes, stats = assign_codes(latents, q, sinkhorn_rounds=rounds, seed=seed)
    assert_valid(codes, n, levels, size)
    assert stats["collisions_final"] == 0
    assert stats["collisions_after_nearest"] == count_collisions(q.encode_codes(latents).numpy())
    assert stats["collisions_after_sinkhorn"] <= stats["collisions_after_nearest"]
    assert_unique_codes_kept(latents, q, codes)


@pytest.mark.parametrize(("levels", "size"), [(2, 5), (3, 3), (3, 4)])
@pytest.mark.parametrize("distinct", [1, 7])
def test_full_capacity(levels: int, size: int, distinct: int) -> None:
    n = size**levels
    q = random_quantizer(levels, size, seed=1)
    codes, stats = assign_codes(duplicated_latents(n, distinct, seed=2), q)
    assert_valid(codes, n, levels, size)  # every one of the K**L codes is used once
    assert stats["moved_to_other_prefix"] > 0


def test_over_capacity_raises() -> None:
    q = random_quantizer(2, 3, seed=0)
    with pytest.raises(ValueError, match=r"K\*\*L"):
        assign_codes(torch.randn(10, DIM), q)


def test_deterministic_given_seed() -> None:
    q = random_quantizer(3, 4, seed=5)
    latents = duplicated_latents(50, 9, seed=5)
    first = assign_codes(latents, q, seed=11)
    second = assign_codes(latents.clone(), q, seed=11)
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]


def test_no_collisions_means_no_changes() -> None:
    q = hierarchical_quantizer(2, 8, seed=3)
    # Latents sitting exactly on distinct full codes: nearest quantisation is already collision-free.
    books = q.codebooks.detach()
    pairs = [(i, j) for i in range(8) for j in range(8)][::3]
    latents = torch.stack([books[0, i] + books[1, j] for i, j in pairs])
    nearest = q.encode_codes(latents).numpy()
    assert count_collisions(nearest) == 0
    codes, stats = assign_codes(latents, q)
    assert np.array_equal(codes, nearest)
    assert stats["changed_total"] == stats["moved_by_sinkhorn"] == stats["moved_by_fallback"] == 0
    assert stats["sinkhorn_rounds_used"] == 0


def test_sinkhorn_repair_splits_duplicates_within_their_bucket() -> None:
    q = random_quantizer(3, 8, seed=4)
    latents = torch.randn(1, DIM).repeat(5, 1)  # five identical locations, room for eight
    codes, stats = assign_codes(latents, q, seed=0)
    assert stats["collisions_after_nearest"] == 4
    assert stats["collisions_after_sinkhorn"] == 0 and stats["moved_by_fallback"] == 0
    # Only the last level changed: they all stay in their (L-1)-prefix bucket.
    nearest = q.encode_codes(latents).numpy()
    assert (codes[:, :2] == nearest[:, :2]).all()
    assert_valid(codes, 5, 3, 8)


def test_sinkhorn_keeps_codes_of_non_colliding_neighbours_out_of_reach() -> None:
    q = hierarchical_quantizer(2, 4, seed=6)
    books = q.codebooks.detach()
    # Three singletons on codes (0, 0..2) and three duplicates on (0, 3): only one free code, (0, 3),
    # is left under prefix 0, so two duplicates must leave the bucket.
    singles = torch.stack([books[0, 0] + books[1, j] for j in range(3)])
    dupes = (books[0, 0] + books[1, 3]).repeat(3, 1)
    latents = torch.cat([singles, dupes])
    nearest = q.encode_codes(latents).numpy()
    assert np.array_equal(nearest, [[0, 0], [0, 1], [0, 2], [0, 3], [0, 3], [0, 3]])
    codes, stats = assign_codes(latents, q)
    assert_valid(codes, 6, 2, 4)
    assert np.array_equal(codes[:3], nearest[:3])
    assert stats["moved_to_other_prefix"] == 2
    assert (codes[3:, 0] == 0).sum() == 1


def test_overflow_goes_to_nearest_prefix() -> None:
    # Level-0 codes on a line at 0, 1, 10, 11; 6 identical locations at 0 with K = 4 need a second
    # prefix, and the nearest one (code 1) is chosen over the far ones.
    q = ResidualQuantizer(2, 4, 1)
    with torch.no_grad():
        q.codebooks[0, :, 0] = torch.tensor([0.0, 1.0, 10.0, 11.0])
        q.codebooks[1, :, 0] = torch.tensor([0.0, 0.1, 0.2, 0.3])
    latents = torch.zeros(6, 1)
    codes, stats = assign_codes(latents, q)
    assert_valid(codes, 6, 2, 4)
    assert sorted(codes[:, 0].tolist()) == [0, 0, 0, 0, 1, 1]
    assert stats["moved_to_other_prefix"] == 2


def test_overflow_climbs_levels_when_subtree_is_full() -> None:
    # L = 3, K = 2: 5 identical locations do not fit in the 4 codes under their level-0 code, so one
    # must change its first code.
    q = random_quantizer(3, 2, seed=8)
    latents = torch.randn(1, DIM).repeat(5, 1)
    codes, _ = assign_codes(latents, q)
    assert_valid(codes, 5, 3, 2)
    assert len(set(codes[:, 0].tolist())) == 2


def test_latents_on_other_dtype() -> None:
    q = random_quantizer(2, 4, seed=9)
    codes, _ = assign_codes(duplicated_latents(10, 3, seed=1).double(), q)
    assert_valid(codes, 10, 2, 4)


def test_empty_input() -> None:
    q = random_quantizer(2, 4, seed=9)
    codes, stats = assign_codes(torch.zeros(0, DIM), q)
    assert codes.shape == (0, 2) and stats["collisions_final"] == 0
