"""``RQVAEModule``: trains the RQ-VAE location tokenizer on description embeddings.

Thin on purpose: the model is :class:`location_tokenizers.rqvae.RQVAE` (plain ``nn.Module``s); this
module owns the optimisation loop, k-means initialisation, dead-code re-seeding and the per-epoch
figures logged to TensorBoard:

* ``rqvae/recon``, ``rqvae/quant``, ``rqvae/train_loss`` — the losses (all tags under ``rqvae/``, so
  that they never mix with the alignment's on a dashboard);
* ``rqvae/usage_l{i}`` (distinct codes used / K) and ``rqvae/perplexity_l{i}`` per level, and
  ``rqvae/codes_l{i}``, a histogram of the code each location takes at level i (every
  ``histogram_every`` epochs and at the last);
* ``rqvae/collision_rate`` over all locations (nearest codes, before the collision repair);
* ``rqvae/score`` = collision rate + reconstruction MSE over all locations: what early stopping
  and checkpointing watch;
* with :class:`CoherenceMonitor`, every few epochs: ``rqvae/km_same_l1``, ``rqvae/km_same_l12``
  (mean km between locations sharing a prefix) and ``rqvae/purity_l12`` (category purity) of the
  nearest codes, so the spatial and semantic structure can be watched as it forms.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_modules.hardware import autocast_dtype
from location_tokenizers.quality import coherence_arrays, location_arrays
from location_tokenizers.rqvae import RQVAE, code_usage, perplexity


class RQVAEModule(L.LightningModule):
    """Lightning wrapper around :class:`RQVAE`.

    Args:
        in_dim: Embedding size.
        hidden_dims: Encoder MLP widths (the decoder mirrors them).
        latent_dim: Size of the quantised latent.
        num_levels: L, codebooks.
        codebook_size: K, codes per level.
        beta: Commitment weight.
        sinkhorn_epsilon: Entropic regularisation of the balanced last-level assignment.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        reseed_every: Re-seed never-used codes every this many epochs (0 = never).
        kmeans_init: Initialise codebooks by k-means on the first fit.
        seed: Seed of k-means and re-seeding.
        mlp_precision: Resolved precision of the encoder/decoder MLPs (``bf16-mixed`` autocasts them;
            the quantizer stays float32, see :class:`RQVAE`).
        histogram_every: Epochs between two code-usage histograms (0 = never).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: list[int] | tuple[int, ...] = (2048, 1024, 512, 256, 128, 64),
        latent_dim: int = 32,
        num_levels: int = 4,
        codebook_size: int = 64,
        beta: float = 0.25,
        sinkhorn_epsilon: float = 0.003,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        reseed_every: int = 20,
        kmeans_init: bool = True,
        seed: int = 0,
        mlp_precision: str = "32-true",
        histogram_every: int = 10,
    ) -> None:
        super().__init__()
        # logger=False: the stage logs the run's whole configuration as the HPARAMS of its dashboard.
        self.save_hyperparameters(logger=False)
        self.model = RQVAE(
            in_dim=in_dim,
            hidden_dims=list(hidden_dims),
            latent_dim=latent_dim,
            num_levels=num_levels,
            codebook_size=codebook_size,
            beta=beta,
            sinkhorn_epsilon=sinkhorn_epsilon,
            mlp_dtype=autocast_dtype(mlp_precision),
        )
        # Whole-table figures need all embeddings; set by the caller (not saved in checkpoints).
        self.all_embeddings: Tensor | None = None
        self._initialised = False

    def set_embeddings(self, embeddings: Tensor) -> None:
        """All location embeddings, for k-means init, re-seeding and per-epoch figures."""
        self.all_embeddings = embeddings

    def on_fit_start(self) -> None:
        if self.hparams.kmeans_init and not self._initialised and self.all_embeddings is not None:
            with torch.no_grad():
                z = self.model.encode(self.all_embeddings.to(self.device))
                self.model.quantizer.kmeans_init(z, seed=self.hparams.seed)
            self._initialised = True

    def model_step(self, x: Tensor, use_sinkhorn: bool) -> dict[str, Tensor]:
        """Forward + losses, shared by training and evaluation."""
        out = self.model(x, use_sinkhorn=use_sinkhorn)
        out["loss"] = out["recon_loss"] + out["quant_loss"]
        return out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        # Sinkhorn balances the last level during training only; final codes are assigned later.
        out = self.model_step(x, use_sinkhorn=self.hparams.sinkhorn_epsilon > 0)
        self.log("rqvae/train_loss", out["loss"], prog_bar=True, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("rqvae/recon", out["recon_loss"], on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("rqvae/quant", out["quant_loss"], on_step=False, on_epoch=True, batch_size=x.shape[0])
        return out["loss"]

    @torch.no_grad()
    def table_figures(self) -> dict[str, float]:
        """Usage, perplexity, collision rate and reconstruction over all locations."""
        assert self.all_embeddings is not None
        x = self.all_embeddings.to(self.device)
        out = self.model_step(x, use_sinkhorn=False)
        codes = out["codes"]
        self._last_codes = codes
        k = self.hparams.codebook_size
        figures = {"rqvae/recon_all": float(out["recon_loss"])}
        for level, (u, p) in enumerate(zip(code_usage(codes, k).tolist(), perplexity(codes, k).tolist())):
            figures[f"rqvae/usage_l{level}"] = u
            figures[f"rqvae/perplexity_l{level}"] = p
        distinct = torch.unique(codes, dim=0).shape[0]
        figures["rqvae/collision_rate"] = 1.0 - distinct / codes.shape[0]
        figures["rqvae/score"] = figures["rqvae/collision_rate"] + figures["rqvae/recon_all"]
        return figures

    def on_train_epoch_end(self) -> None:
        if self.all_embeddings is None:
            return
        figures = self.table_figures()
        self.log_dict(figures, prog_bar=False)
        self._log_histograms()
        every = self.hparams.reseed_every
        if every and (self.current_epoch + 1) % every == 0:
            with torch.no_grad():
                x = self.all_embeddings.to(self.device)
                z = self.model.encode(x)
                codes = self.model.quantizer.encode_codes(z)
                k = self.hparams.codebook_size
                counts = torch.stack([torch.bincount(codes[:, level], minlength=k) for level in range(codes.shape[1])])
                reseeded = self.model.quantizer.reseed_dead_codes(z, counts, seed=self.hparams.seed + self.current_epoch)
            self.log("rqvae/reseeded", float(reseeded))

    def _log_histograms(self) -> None:
        every = int(self.hparams.get("histogram_every", 0) or 0)
        epoch = self.current_epoch + 1
        last = epoch >= int(self.trainer.max_epochs or 0) or self.trainer.should_stop
        experiment = getattr(self.logger, "experiment", None)
        if every <= 0 or not (epoch == 1 or epoch % every == 0 or last) or not hasattr(experiment, "add_histogram"):
            return
        k = int(self.hparams.codebook_size)
        for level in range(self._last_codes.shape[1]):
            # One bin per code: the shape shows dead codes and crowded ones at a glance.
            experiment.add_histogram(f"rqvae/codes_l{level}", self._last_codes[:, level].float().cpu(), global_step=epoch,
                                     bins=torch.arange(k + 1, dtype=torch.float32).numpy() - 0.5)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: one kernel for the whole update instead of a dozen element-wise passes per tensor; the
        # optimiser step was a quarter of an NYC epoch on a CPU (0.85 instead of 1.2 s an epoch fused).
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)


class CoherenceMonitor(L.Callback):
    """Logs the coherence figures of :func:`location_tokenizers.quality.coherence` for the nearest codes
    of all locations every ``every`` epochs (and after the last): how many epochs the structure needs.

    Args:
        locations: The location table (``loc_id, lat, lon, category``).
        loc_ids: Location id of each row of the module's embeddings.
        every: Epochs between two evaluations (0 = never).
    """

    def __init__(self, locations: Any, loc_ids: Any, every: int = 25) -> None:
        # Aligned arrays, made here in the parent: the per-epoch figures are numpy only, because Polars
        # deadlocks in processes forked after its thread pool started (ddp_fork).
        self.places = location_arrays(locations, loc_ids)
        self.every = int(every)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = epoch >= int(trainer.max_epochs or 0) or trainer.should_stop
        if self.every <= 0 or pl_module.all_embeddings is None or not (epoch % self.every == 0 or last):
            return
        with torch.no_grad():
            codes = pl_module.model.get_codes(pl_module.all_embeddings.to(pl_module.device)).cpu().numpy()
        fig = coherence_arrays(codes, *self.places, int(pl_module.hparams.codebook_size))
        pl_module.log_dict({"rqvae/km_same_l1": fig["mean_km_same_l1"], "rqvae/km_same_l12": fig["mean_km_same_l12"],
                            "rqvae/purity_l12": fig["category_purity_l12"]})
