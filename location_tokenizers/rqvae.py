"""RQ-VAE for location tokens (QT-Mob, arXiv 2506.11109, Sec. "Location tokenization").

An MLP encoder maps a location's description embedding to a latent ``z``; a residual quantizer
then writes ``z`` as a sum of ``L`` codewords, one per level, each taken from its own codebook of
``K`` entries, and the indices of those codewords are the location's discrete code ``(c_1, ..., c_L)``.
A mirrored MLP decoder reconstructs the embedding from the quantised latent.

Everything here is a plain ``nn.Module`` or function so that it can be trained by a Lightning module,
a bare loop or a test alike. Two extras keep the codebooks healthy:

* :func:`~location_tokenizers.quantizer.sinkhorn` gives a balanced assignment (every code receives the
  same share of a batch); the quantizer uses it on the last level during training when asked, as the
  paper does, to spread locations over the codes that make their full codes distinct.
* ``ResidualQuantizer.kmeans_init`` and ``reseed_dead_codes`` (location_tokenizers/quantizer.py) start
  the codebooks on the data and revive codes nobody uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from location_tokenizers.quantizer import ResidualQuantizer

__all__ = ["MLP", "RQVAE", "code_usage", "perplexity"]


class MLP(nn.Module):
    """A stack of ``Linear`` layers with ReLU (and optional dropout) between them.

    There is no activation after the last layer, so the output can take any real value (a latent
    or a reconstructed embedding).

    Args:
        dims: Layer widths, input first: ``[in, h1, ..., out]`` (at least two entries).
        dropout: Dropout probability after each hidden activation.
    """

    def __init__(self, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        dims = list(dims)
        if len(dims) < 2:
            raise ValueError(f"MLP needs at least an input and an output width, got {dims}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        self.net = nn.Sequential(*layers)
        # He initialisation keeps the activation scale through deep ReLU stacks. PyTorch's default
        # (uniform, a=sqrt(5)) shrinks it by ~sqrt(6) per layer: through the official 6-hidden-layer
        # encoder the latents start ~1e-3 wide, the commitment loss then pins them to one code
        # and the RQ-VAE never leaves that collapse (measured on the NYC descriptions).
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the stack.

        Args:
            x: ``(..., dims[0])``.

        Returns:
            ``(..., dims[-1])``.
        """
        return self.net(x)


class RQVAE(nn.Module):
    """Encoder MLP, residual quantizer and mirrored decoder MLP.

    Args:
        in_dim: Width of the input embeddings.
        hidden_dims: Encoder hidden widths (the decoder uses them reversed).
        latent_dim: Width of the quantised latent.
        num_levels: ``L``, code length.
        codebook_size: ``K``, entries per codebook.
        beta: Commitment weight.
        sinkhorn_epsilon: Entropic regularisation of the last-level balanced assignment.
        dropout: Dropout after each hidden activation of both MLPs.
        mlp_dtype: Autocast dtype of the encoder and decoder MLPs (e.g. ``torch.bfloat16`` where the
            hardware multiplies bf16 natively), or None for float32. The quantizer (distances, code
            choice, VQ losses) and the reconstruction loss always run in float32: code assignment
            must not depend on bf16 rounding.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int] = (2048, 1024, 512, 256, 128, 64),
        latent_dim: int = 32,
        num_levels: int = 4,
        codebook_size: int = 64,
        beta: float = 0.25,
        sinkhorn_epsilon: float = 0.003,
        dropout: float = 0.0,
        mlp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.mlp_dtype = mlp_dtype
        hidden = list(hidden_dims)
        self.encoder = MLP([in_dim, *hidden, latent_dim], dropout)
        self.decoder = MLP([latent_dim, *reversed(hidden), in_dim], dropout)
        self.quantizer = ResidualQuantizer(num_levels, codebook_size, latent_dim, beta, sinkhorn_epsilon)

    def forward(self, x: Tensor, use_sinkhorn: bool = False) -> dict[str, Tensor]:
        """Encode, quantise and decode.

        Args:
            x: ``(B, in_dim)`` embeddings.
            use_sinkhorn: Balanced (Sinkhorn) assignment on the last level, see
                :meth:`ResidualQuantizer.forward`.

        Returns:
            ``recon`` ``(B, in_dim)``, ``z`` and ``z_q`` ``(B, latent)``, ``codes`` ``(B, L)``,
            ``quant_loss`` and ``recon_loss`` (MSE) scalars.
        """
        z = self.encode(x)
        z_q, quant_loss, codes, _ = self.quantizer(z, use_sinkhorn=use_sinkhorn)
        recon = self._run_mlp(self.decoder, z_q)
        return {
            "recon": recon,
            "z": z,
            "z_q": z_q,
            "codes": codes,
            "quant_loss": quant_loss,
            "recon_loss": F.mse_loss(recon, x),
        }

    def _run_mlp(self, mlp: nn.Module, x: Tensor) -> Tensor:
        """``mlp(x)`` in ``mlp_dtype`` (autocast), returned as float32."""
        if self.mlp_dtype is None:
            return mlp(x)
        with torch.autocast(x.device.type, dtype=self.mlp_dtype):
            return mlp(x).float()

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``(B, latent)`` (float32) of embeddings ``(B, in_dim)``."""
        return self._run_mlp(self.encoder, x)

    @torch.no_grad()
    def get_codes(self, x: Tensor) -> Tensor:
        """Nearest codes ``(B, L)`` of embeddings ``(B, in_dim)`` (no Sinkhorn, no collision repair)."""
        return self.quantizer.encode_codes(self.encode(x))


def _histograms(codes: Tensor, codebook_size: int) -> Tensor:
    """``(L, K)`` counts of each code per level."""
    codes = codes.to("cpu", torch.long)
    if codes.dim() != 2:
        raise ValueError(f"codes must be (B, L), got shape {tuple(codes.shape)}")
    return torch.stack([torch.bincount(codes[:, level], minlength=codebook_size) for level in range(codes.shape[1])])


def code_usage(codes: Tensor, codebook_size: int) -> Tensor:
    """Share of each level's codes that appear at least once.

    Args:
        codes: ``(B, L)`` integer codes.
        codebook_size: ``K``.

    Returns:
        ``(L,)`` float in ``[0, 1]``.
    """
    return (_histograms(codes, codebook_size) > 0).sum(1).float() / codebook_size


def perplexity(codes: Tensor, codebook_size: int) -> Tensor:
    """``exp`` of the entropy of each level's code histogram (effective number of codes used).

    Args:
        codes: ``(B, L)`` integer codes.
        codebook_size: ``K``.

    Returns:
        ``(L,)`` float in ``[1, K]`` (1 for an empty batch).
    """
    hist = _histograms(codes, codebook_size).double()
    p = hist / hist.sum(1, keepdim=True).clamp_min(1.0)
    # 0 * log 0 is taken as 0: unused codes add no entropy.
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return entropy.exp().float()
