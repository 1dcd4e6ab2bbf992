"""The residual quantizer of the RQ-VAE: codebooks, balanced (Sinkhorn) assignment, k-means start and
dead-code re-seeding. :mod:`location_tokenizers.rqvae` puts it between the MLP encoder and decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResidualQuantizer", "sinkhorn", "squared_distances"]


def squared_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances between rows of ``x`` and rows of ``codebook``.

    Args:
        x: ``(B, D)``.
        codebook: ``(K, D)``.

    Returns:
        ``(B, K)``, non-negative.
    """
    # The expanded form avoids materialising a (B, K, D) difference tensor; the clamp removes the
    # tiny negatives that cancellation produces for (near-)identical vectors.
    d = x.pow(2).sum(1, keepdim=True) - 2.0 * x @ codebook.t() + codebook.pow(2).sum(1)[None, :]
    return d.clamp_min(0.0)


def sinkhorn(cost: Tensor, epsilon: float, iters: int = 50) -> Tensor:
    """Balanced entropic optimal transport between ``B`` samples and ``K`` codes.

    Each sample carries mass ``1/B`` and each code receives mass ``1/K``; the plan minimises
    ``<P, C> - epsilon * H(P)``. The cost is first shifted and divided by its range (max - min), so
    ``epsilon`` means the same thing whatever the scale of the distances. The iterations run in the
    log domain (in float64), so a small ``epsilon`` cannot overflow ``exp``.

    Args:
        cost: ``(B, K)`` cost of giving each sample each code (e.g. squared distances).
        epsilon: Entropic regularisation, relative to the normalised cost; smaller is closer to an
            exact (hard, balanced) assignment but needs more iterations to converge.
        iters: Number of Sinkhorn iterations (each one a row then a column normalisation).

    Returns:
        ``(B, K)`` transport plan in ``cost``'s dtype; its columns sum to exactly ``1/K`` and its
        rows to ``1/B`` up to the convergence reached in ``iters`` iterations.
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be (B, K), got shape {tuple(cost.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    b, k = cost.shape
    c = cost.detach().to(torch.float64)
    c = c - c.min()
    scale = c.max()
    if scale > 0:  # a constant cost has no scale; it stays all zeros (a uniform plan).
        c = c / scale
    log_kernel = -c / epsilon
    log_a = -math.log(b)
    log_b = -math.log(k)
    u = torch.zeros(b, dtype=torch.float64, device=cost.device)
    v = torch.zeros(k, dtype=torch.float64, device=cost.device)
    for _ in range(iters):
        u = log_a - torch.logsumexp(log_kernel + v[None, :], dim=1)
        v = log_b - torch.logsumexp(log_kernel + u[:, None], dim=0)
    return torch.exp(log_kernel + u[:, None] + v[None, :]).to(cost.dtype)


def _noise_scale(x: Tensor) -> float:
    """A jitter size small next to the spread of ``x`` (never zero, even for identical rows)."""
    spread = x.std(dim=0, unbiased=False).mean() if x.shape[0] > 1 else x.abs().mean()
    return max(1e-3 * float(spread), 1e-6)


def _kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """Seeded k-means (k-means++ seeding, then Lloyd iterations).

    Args:
        x: ``(N, D)`` points.
        k: Number of centres.
        iters: Maximum Lloyd iterations (stops early when assignments settle).
        generator: CPU generator that makes the result reproducible.

    Returns:
        ``(k, D)`` centres, on ``x``'s device and dtype.
    """
    n, dim = x.shape
    xc = x.detach().to("cpu", torch.float32)
    noise = _noise_scale(xc)
    if n < k:
        # Too few points for k distinct centres: use every point once, then fill the rest by
        # sampling with replacement; the jitter keeps the copies apart so ties break consistently.
        extra = torch.randint(n, (k - n,), generator=generator)
        idx = torch.cat([torch.randperm(n, generator=generator), extra])
        centres = xc[idx].clone()
        centres[n:] += noise * torch.randn(k - n, dim, generator=generator)
        return centres.to(x.device, x.dtype)

    # k-means++: each new centre is drawn with probability proportional to the squared distance to
    # the nearest centre chosen so far, which spreads the starting centres over the data.
    centres = torch.empty(k, dim)
    centres[0] = xc[torch.randint(n, (1,), generator=generator)]
    closest = squared_distances(xc, centres[:1]).squeeze(1)
    for j in range(1, k):
        total = closest.sum()
        if total > 0:
            pick = torch.multinomial(closest / total, 1, generator=generator)
            centres[j] = xc[pick]
        else:
            # Fewer distinct points than centres (duplicates): reuse a point, slightly jittered.
            pick = torch.randint(n, (1,), generator=generator)
            centres[j] = xc[pick] + noise * torch.randn(dim, generator=generator)
        closest = torch.minimum(closest, squared_distances(xc, centres[j : j + 1]).squeeze(1))

    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new_assign = squared_distances(xc, centres).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros(k, dim).index_add_(0, assign, xc)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        # An empty cluster keeps its previous centre instead of collapsing onto the origin.
        centres[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    return centres.to(x.device, x.dtype)


class ResidualQuantizer(nn.Module):
    """``L`` levels of vector quantisation, each level quantising what the previous ones left.

    Level ``l`` picks the codeword of codebook ``l`` nearest (squared L2) to the residual
    ``r_l = z - sum_{j<l} e_j``; the location's code is the tuple of the picked indices.

    Args:
        num_levels: ``L``, number of codebooks (code length).
        codebook_size: ``K``, entries per codebook.
        dim: Latent width.
        beta: Weight of the commitment term.
        sinkhorn_epsilon: Entropic regularisation of the last-level balanced assignment.
        sinkhorn_iters: Sinkhorn iterations.

    Attributes:
        codebooks: ``nn.Parameter`` of shape ``(L, K, dim)``.
    """

    def __init__(
        self,
        num_levels: int,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        sinkhorn_epsilon: float = 0.003,
        sinkhorn_iters: int = 50,
    ) -> None:
        super().__init__()
        if num_levels < 1 or codebook_size < 1 or dim < 1:
            raise ValueError("num_levels, codebook_size and dim must be positive")
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = beta
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        # The VQ-VAE default: a small uniform box around the origin. kmeans_init replaces it with
        # data-driven codebooks, which is what training should normally start from.
        bound = 1.0 / codebook_size
        self.codebooks = nn.Parameter(torch.empty(num_levels, codebook_size, dim).uniform_(-bound, bound))

    @torch.no_grad()
    def greedy_path(self, z: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Nearest-code quantisation of ``z``, keeping everything seen along the way.

        Args:
            z: ``(B, dim)`` latents.

        Returns:
            ``codes`` ``(B, L)`` long; ``residuals`` ``(B, L, dim)`` (the residual entering each
            level); ``distances``: ``L`` tensors ``(B, K)``, the squared distances from each level's
            residual to every code of that level.
        """
        z = z.detach().to(self.codebooks.dtype)
        residual = z
        codes, residuals, dists = [], [], []
        for level in range(self.num_levels):
            book = self.codebooks[level].detach()
            d = squared_distances(residual, book)
            idx = d.argmin(1)
            codes.append(idx)
            residuals.append(residual)
            dists.append(d)
            residual = residual - book[idx]
        return torch.stack(codes, 1), torch.stack(residuals, 1), dists

    def forward(self, z: Tensor, use_sinkhorn: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Quantise a batch, with the VQ losses and a straight-through gradient.

        Args:
            z: ``(B, dim)`` latents from the encoder.
            use_sinkhorn: Pick the last level's codes as the argmax of a balanced Sinkhorn plan
                (over the distances) instead of the nearest codes, spreading the batch evenly over
                the last codebook.

        Returns:
            ``z_q`` ``(B, dim)``: the quantised latent, whose gradient flows to ``z`` unchanged
            (straight-through); ``loss``: scalar, the sum over levels of
            ``mse(sg(r), e) + beta * mse(r, sg(e))``; ``codes`` ``(B, L)`` long; ``residuals``
            ``(B, L, dim)``: the (detached) residual entering each level.
        """
        residual = z
        quantised = torch.zeros_like(z)
        loss = z.new_zeros(())
        codes, residuals = [], []
        for level in range(self.num_levels):
            book = self.codebooks[level]
            with torch.no_grad():
                d = squared_distances(residual.detach(), book.detach())
                if use_sinkhorn and level == self.num_levels - 1:
                    plan = sinkhorn(d, self.sinkhorn_epsilon, self.sinkhorn_iters)
                    idx = plan.argmax(1)
                else:
                    idx = d.argmin(1)
            e = book[idx]
            # Codebook term moves the codes towards the residuals; commitment term (the only
            # path from this loss to the encoder) keeps the residuals close to their codes.
            loss = loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            codes.append(idx)
            residuals.append(residual.detach())
            quantised = quantised + e.detach()
            # Detached codes: each level's residual depends on the encoder only through z, so the
            # commitment gradients all reach the encoder without passing through other codebooks.
            residual = residual - e.detach()
        z_q = z + (quantised - z).detach()
        return z_q, loss, torch.stack(codes, 1), torch.stack(residuals, 1)

    @torch.no_grad()
    def encode_codes(self, z: Tensor) -> Tensor:
        """Nearest codes per level (no Sinkhorn, no gradient).

        Args:
            z: ``(B, dim)``.

        Returns:
            ``(B, L)`` long.
        """
        return self.greedy_path(z)[0]

    @torch.no_grad()
    def distances(self, z: Tensor) -> list[Tensor]:
        """Per-level squared distances along the greedy (nearest-code) path.

        Args:
            z: ``(B, dim)``.

        Returns:
            ``L`` tensors ``(B, K)``; entry ``l`` holds the distances from the residual that
            level ``l`` quantises (after the nearest codes of levels ``< l``) to each code of level ``l``.
        """
        return self.greedy_path(z)[2]

    @torch.no_grad()
    def kmeans_init(self, z: Tensor, iters: int = 25, seed: int = 0) -> None:
        """Initialise every codebook by k-means on that level's residuals.

        Level 0 clusters ``z``; level ``l`` clusters what remains after the (new) nearest codes of
        levels ``< l``. Seeded k-means++; if there are fewer points than codes, points are reused
        with a small jitter.

        Args:
            z: ``(N, dim)`` latents (typically the encoder's output on the whole training set).
            iters: Lloyd iterations per level.
            seed: Seed of the k-means++ sampling.
        """
        generator = torch.Generator().manual_seed(seed)
        residual = z.detach().to(self.codebooks.dtype)
        for level in range(self.num_levels):
            centres = _kmeans(residual, self.codebook_size, iters, generator)
            self.codebooks.data[level] = centres.to(self.codebooks.device)
            idx = squared_distances(residual, self.codebooks[level]).argmin(1)
            residual = residual - self.codebooks[level][idx]

    @torch.no_grad()
    def reseed_dead_codes(self, z: Tensor, counts: Tensor, seed: int = 0) -> int:
        """Move codes that nobody used onto residuals of the current data.

        Levels are processed in order and the residuals are recomputed after each level's
        reseeding, so a later level sees the residuals its reseeded predecessors produce. A dead
        code is moved onto the residual of a sample drawn with probability proportional to its
        squared distance from its nearest code (badly represented samples are preferred, as in
        k-means++), without replacement while there are enough samples. Note that an optimiser's
        running statistics (e.g. Adam moments) for the moved rows are left as they were.

        Args:
            z: ``(N, dim)`` latents to draw residuals from.
            counts: ``(L, K)`` recent usage of each code; codes with count 0 are reseeded.
            seed: Seed of the sampling.

        Returns:
            Number of codes reseeded (over all levels).
        """
        if tuple(counts.shape) != (self.num_levels, self.codebook_size):
            expected = (self.num_levels, self.codebook_size)
            raise ValueError(f"counts must be (L, K) = {expected}, got {tuple(counts.shape)}")
        generator = torch.Generator().manual_seed(seed)
        residual = z.detach().to(self.codebooks.dtype)
        n = residual.shape[0]
        reseeded = 0
        for level in range(self.num_levels):
            dead = torch.nonzero(counts[level].to("cpu") == 0).flatten()
            if n > 0 and dead.numel() > 0:
                d = squared_distances(residual, self.codebooks[level]).min(1).values.to("cpu", torch.float64)
                weights = d if d.sum() > 0 else torch.ones_like(d)
                replace = dead.numel() > int((weights > 0).sum())
                picks = torch.multinomial(weights, dead.numel(), replacement=replace, generator=generator)
                new = residual[picks.to(residual.device)].clone()
                # Jitter keeps two codes reseeded onto the same (or an identical) sample distinct.
                jitter = _noise_scale(residual) * torch.randn(new.shape, generator=generator, dtype=torch.float32)
                self.codebooks.data[level, dead.to(self.codebooks.device)] = new + jitter.to(new)
                reseeded += dead.numel()
            idx = squared_distances(residual, self.codebooks[level]).argmin(1)
            residual = residual - self.codebooks[level][idx]
        return reseeded
