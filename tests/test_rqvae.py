"""Tests for the RQ-VAE building blocks (``location_tokenizers.rqvae``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from location_tokenizers.quantizer import ResidualQuantizer, sinkhorn, squared_distances
from location_tokenizers.rqvae import MLP, RQVAE, code_usage, perplexity

IN_DIM, LATENT, LEVELS, K = 64, 16, 3, 16


def clustered(seed: int = 0, n: int = 300, clusters: int = 20) -> torch.Tensor:
    """``n`` points in 64-d around ``clusters`` Gaussian centres (unit scale, like text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, IN_DIM, generator=g)
    labels = torch.randint(clusters, (n,), generator=g)
    return centres[labels] + 0.1 * torch.randn(n, IN_DIM, generator=g)


def small_model(seed: int = 0) -> RQVAE:
    torch.manual_seed(seed)
    return RQVAE(IN_DIM, hidden_dims=[128, 64], latent_dim=LATENT, num_levels=LEVELS, codebook_size=K)


def histogram_counts(codes: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([torch.bincount(codes[:, level], minlength=k) for level in range(codes.shape[1])])


# --------------------------------------------------------------------------------------------- MLP


def test_mlp_has_no_activation_after_last_layer() -> None:
    mlp = MLP([8, 16, 12, 4], dropout=0.1)
    layers = list(mlp.net)
    assert isinstance(layers[-1], nn.Linear)
    assert sum(isinstance(m, nn.Linear) for m in layers) == 3
    assert sum(isinstance(m, nn.ReLU) for m in layers) == 2
    assert sum(isinstance(m, nn.Dropout) for m in layers) == 2
    assert mlp(torch.randn(5, 8)).shape == (5, 4)
    # Negative outputs are possible only without a final ReLU.
    mlp.eval()
    assert (mlp(torch.randn(200, 8)) < 0).any()


def test_mlp_rejects_single_width() -> None:
    with pytest.raises(ValueError):
        MLP([8])


# ----------------------------------------------------------------------------------- shapes, grads


@pytest.mark.parametrize("use_sinkhorn", [False, True])
def test_rqvae_shapes(use_sinkhorn: bool) -> None:
    model = small_model()
    x = torch.randn(10, IN_DIM)
    out = model(x, use_sinkhorn=use_sinkhorn)
    assert out["recon"].shape == (10, IN_DIM)
    assert out["z"].shape == out["z_q"].shape == (10, LATENT)
    assert out["codes"].shape == (10, LEVELS) and out["codes"].dtype == torch.long
    assert int(out["codes"].min()) >= 0 and int(out["codes"].max()) < K
    assert out["quant_loss"].shape == out["recon_loss"].shape == ()
    assert model.encode(x).shape == (10, LATENT)
    assert model.get_codes(x).shape == (10, LEVELS)
    assert torch.equal(model.get_codes(x), model(x)["codes"])


def test_default_architecture_matches_paper() -> None:
    model = RQVAE(in_dim=32)
    widths = [m.out_features for m in model.encoder.net if isinstance(m, nn.Linear)]
    assert widths == [2048, 1024, 512, 256, 128, 64, 32]
    widths = [m.out_features for m in model.decoder.net if isinstance(m, nn.Linear)]
    assert widths == [64, 128, 256, 512, 1024, 2048, 32]
    assert tuple(model.quantizer.codebooks.shape) == (4, 64, 32)


def test_quantizer_outputs() -> None:
    q = ResidualQuantizer(LEVELS, K, LATENT)
    z = torch.randn(7, LATENT)
    z_q, loss, codes, residuals = q(z, use_sinkhorn=False)
    assert z_q.shape == (7, LATENT) and loss.shape == ()
    assert codes.shape == (7, LEVELS) and residuals.shape == (7, LEVELS, LATENT)
    books = q.codebooks.detach()
    # z_q is the sum of the picked codewords; residual l is z minus the first l of them.
    picked = torch.stack([books[level][codes[:, level]] for level in range(LEVELS)], 1)
    torch.testing.assert_close(z_q, picked.sum(1))
    torch.testing.assert_close(residuals[:, 0], z)
    torch.testing.assert_close(residuals[:, 2], z - picked[:, 0] - picked[:, 1])
    assert torch.equal(codes, q.encode_codes(z))
    dists = q.distances(z)
    assert len(dists) == LEVELS and all(d.shape == (7, K) for d in dists)
    assert torch.equal(torch.stack([d.argmin(1) for d in dists], 1), codes)


def test_quant_loss_formula() -> None:
    q = ResidualQuantizer(2, 4, 3, beta=0.5)
    z = torch.randn(6, 3)
    _, loss, codes, residuals = q(z)
    books = q.codebooks.detach()
    expected = sum(
        1.5 * F.mse_loss(residuals[:, level], books[level][codes[:, level]]) for level in range(2)
    )
    torch.testing.assert_close(loss, expected)


def test_straight_through_gradient() -> None:
    q = ResidualQuantizer(LEVELS, K, LATENT)
    z = torch.randn(5, LATENT, requires_grad=True)
    z_q, _, _, _ = q(z)
    z_q.sum().backward()
    # The quantiser is the identity for the backward pass.
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_gradients_reach_encoder_and_codebooks() -> None:
    model = small_model()
    out = model(clustered()[:32])
    out["recon_loss"].backward(retain_graph=True)
    first = model.encoder.net[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.quantizer.codebooks.grad is None  # recon reaches codes only via the VQ losses
    model.zero_grad()
    out["quant_loss"].backward()
    assert first.grad.abs().sum() > 0  # commitment term
    assert model.quantizer.codebooks.grad.abs().sum() > 0  # codebook term


def test_loss_decreases_on_clustered_data() -> None:
    x = clustered()
    model = small_model()
    with torch.no_grad():
        model.quantizer.kmeans_init(model.encode(x))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals, recons = [], []
    for _ in range(100):
        out = model(x)
        loss = out["recon_loss"] + out["quant_loss"]
        totals.append(loss.item())
        recons.append(out["recon_loss"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(totals[-10:]) < 0.6 * sum(totals[:10])
    assert sum(recons[-10:]) < 0.5 * sum(recons[:10])


# --------------------------------------------------------------------------- codebook maintenance


def test_kmeans_init_raises_usage() -> None:
    x = clustered()
    model = small_model()
    with torch.no_grad():
        z = model.encode(x)
    q = model.quantizer
    before = code_usage(q.encode_codes(z), K)
    q.kmeans_init(z, seed=0)
    after = code_usage(q.encode_codes(z), K)
    assert after.min() >= 0.9
    assert after.mean() > before.mean() + 0.3
    assert perplexity(q.encode_codes(z), K).min() > 8


def test_kmeans_init_is_seeded() -> None:
    z = torch.randn(100, LATENT)
    a, b = ResidualQuantizer(LEVELS, K, LATENT), ResidualQuantizer(LEVELS, K, LATENT)
    a.kmeans_init(z, seed=3)
    b.kmeans_init(z, seed=3)
    assert torch.equal(a.codebooks, b.codebooks)


@pytest.mark.parametrize("n", [1, 5, 15])
def test_kmeans_init_with_fewer_points_than_codes(n: int) -> None:
    q = ResidualQuantizer(2, K, LATENT)
    z = torch.randn(n, LATENT)
    q.kmeans_init(z, seed=0)
    books = q.codebooks.detach()
    assert torch.isfinite(books).all()
    # Codes are copies of points, jittered apart: all distinct and all close to some point.
    assert torch.unique(books[0], dim=0).shape[0] == K
    assert squared_distances(books[0], z).min(1).values.max() < 1e-2


def test_kmeans_init_with_identical_points() -> None:
    q = ResidualQuantizer(2, 4, 3)
    z = torch.ones(50, 3)
    q.kmeans_init(z)
    assert torch.isfinite(q.codebooks).all()
    assert torch.unique(q.codebooks[0].detach(), dim=0).shape[0] == 4


def test_reseed_dead_codes_raises_usage() -> None:
    x = clustered()
    model = small_model()
    with torch.no_grad():
        z = model.encode(x)
    q = model.quantizer
    codes = q.encode_codes(z)
    counts = histogram_counts(codes, K)
    dead = int((counts == 0).sum())
    assert dead > 0  # the random initialisation leaves codes unused
    before = code_usage(codes, K)
    assert q.reseed_dead_codes(z, counts, seed=0) == dead
    after = code_usage(q.encode_codes(z), K)
    assert after.mean() > before.mean() + 0.2
    # Codes that were in use are left alone.
    alive = counts > 0
    original = small_model().quantizer.codebooks.detach()
    torch.testing.assert_close(q.codebooks.detach()[alive], original[alive])


def test_reseed_nothing_when_all_used() -> None:
    q = ResidualQuantizer(2, 4, 3)
    before = q.codebooks.detach().clone()
    assert q.reseed_dead_codes(torch.randn(20, 3), torch.ones(2, 4, dtype=torch.long)) == 0
    assert torch.equal(before, q.codebooks.detach())


# ---------------------------------------------------------------------------------------- sinkhorn


def test_sinkhorn_marginals_uniform() -> None:
    g = torch.Generator().manual_seed(0)
    cost = 5.0 * torch.rand(200, 16, generator=g) + 3.0
    plan = sinkhorn(cost, epsilon=0.05, iters=100)
    assert plan.shape == (200, 16) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.full((200,), 1 / 200), rtol=1e-3, atol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((16,), 1 / 16), rtol=1e-3, atol=0)
    # Scale-free: an affine change of the cost leaves the plan unchanged.
    torch.testing.assert_close(sinkhorn(1000 * cost - 7, 0.05, 100), plan, rtol=1e-4, atol=1e-9)


def test_sinkhorn_is_stable_for_tiny_epsilon() -> None:
    cost = torch.rand(64, 8) * 1e4
    plan = sinkhorn(cost, epsilon=1e-4, iters=50)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(0), torch.full((8,), 1 / 8), rtol=1e-3, atol=0)


def test_sinkhorn_constant_cost_gives_uniform_plan() -> None:
    plan = sinkhorn(torch.zeros(4, 2), epsilon=0.01)
    torch.testing.assert_close(plan, torch.full((4, 2), 1 / 8))


def test_sinkhorn_argmax_spreads_assignments() -> None:
    g = torch.Generator().manual_seed(1)
    points = 0.2 * torch.randn(256, 8, generator=g)
    book = torch.randn(16, 8, generator=g)
    book[0] = 0.0  # every point is nearest to code 0
    d = squared_distances(points, book)
    nearest_max = int(torch.bincount(d.argmin(1), minlength=16).max())
    balanced_max = int(torch.bincount(sinkhorn(d, 0.003, 50).argmax(1), minlength=16).max())
    assert nearest_max == 256
    assert balanced_max <= 2 * 256 // 16


def test_quantizer_sinkhorn_balances_last_level_only() -> None:
    g = torch.Generator().manual_seed(2)
    q = ResidualQuantizer(2, 8, 4)
    with torch.no_grad():
        q.codebooks.zero_()
        q.codebooks[1] = torch.randn(8, 4, generator=g)
        q.codebooks[1, 0] = 0.0
    z = 0.05 * torch.randn(128, 4, generator=g)
    _, _, plain, _ = q(z, use_sinkhorn=False)
    _, _, balanced, _ = q(z, use_sinkhorn=True)
    assert torch.equal(plain[:, 0], balanced[:, 0])
    assert int(torch.bincount(plain[:, 1], minlength=8).max()) == 128
    assert int(torch.bincount(balanced[:, 1], minlength=8).max()) <= 2 * 128 // 8


# ----------------------------------------------------------------------------- usage / perplexity


def test_usage_and_perplexity_hand_cases() -> None:
    codes = torch.tensor([[0, 0, 0], [1, 0, 0], [2, 0, 1], [3, 0, 1]])
    torch.testing.assert_close(code_usage(codes, 4), torch.tensor([1.0, 0.25, 0.5]))
    torch.testing.assert_close(perplexity(codes, 4), torch.tensor([4.0, 1.0, 2.0]))
    # A skewed histogram: p = (3/4, 1/4) -> exp(H) = 4 / 3**0.75.
    skew = torch.tensor([[0], [0], [0], [1]])
    torch.testing.assert_close(perplexity(skew, 8), torch.tensor([4 / 3**0.75]))
    torch.testing.assert_close(code_usage(skew, 8), torch.tensor([0.25]))


def test_reseed_rejects_wrong_counts_shape() -> None:
    q = ResidualQuantizer(2, 4, 3)
    with pytest.raises(ValueError):
        q.reseed_dead_codes(torch.randn(5, 3), torch.zeros(3, 4))


def test_deepcopy_and_state_dict_roundtrip() -> None:
    model = small_model()
    clone = copy.deepcopy(model)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(4, IN_DIM)
    assert torch.equal(model.get_codes(x), clone.get_codes(x))
