"""``stage=tokenizer``: description embeddings → RQ-VAE → collision-free location codes.

Writes ``<paths.artifacts>/<data.name>/tokenizer-<name>-<fingerprint>/`` atomically (a killed run leaves no codebook a
later run would pick up):

* ``codes.parquet`` — ``loc_id, c0..c{L-1}, code``;
* ``index.json`` — the release's format ``{"<loc id>": ["<a_12>", "<b_3>", ...]}``;
* ``metrics.json`` — collisions, usage and perplexity per level, reconstruction MSE, epochs, seconds,
  coherence figures, and the same figures for the released index when the data has one;
* ``code_map.png`` — locations on lat/lon coloured by level-1 code, with a usage histogram (also
  logged to TensorBoard);
* ``checkpoints/`` — the RQ-VAE's Lightning checkpoints (best and last).

``tokenizer=released`` loads the release's own index instead of training.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from datamodules.artifacts import atomic_dir, file_manifest, reusable, write_json_atomic
from datamodules.errors import DataError
from lightning_modules.dashboards import flat_hparams, log_run
from lightning_modules.embed import embed_texts
from lightning_modules.hardware import compute_device
from lightning_modules.progress import ProgressStyle
from lightning_modules.rqvae_module import CoherenceMonitor, RQVAEModule
from location_tokenizers.assign import assign_codes
from location_tokenizers.baselines import baseline_table
from location_tokenizers.codes import CodeTable
from location_tokenizers.quality import coherence, plot_code_map
from pipeline.config import RunConfig, as_dict, load_config
from pipeline.paths import (
    data_dir,
    embed_dtype,
    released_table,
    rqvae_precision,
    tokenizer_dir,
    tokenizer_fingerprint,
)
from pipeline.trainers import fitted_progress, make_logger, make_trainer

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("codes.parquet", "index.json", "metrics.json", "code_map.png")


def _train_rqvae(cfg: RunConfig, embeddings: np.ndarray, out: Path, locations: pl.DataFrame,
                 loc_ids: np.ndarray) -> tuple[CodeTable | None, dict[str, Any], Any]:
    """Fit the RQ-VAE and assign codes. Returns the table (loc ids filled by the caller), figures, logger.

    ``loc_ids`` is the row order of ``embeddings``; with ``locations`` it gives the coherence figures
    logged every ``tokenizer.coherence_every`` epochs."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset


    t = cfg.tokenizer
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    x = torch.from_numpy(embeddings)
    # Standardise per dimension: LLM hidden states have a few huge dimensions that would dominate MSE.
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)
    x = (x - mean) / std
    module = RQVAEModule(
        in_dim=x.shape[1],
        hidden_dims=list(t.hidden_dims),
        latent_dim=int(t.latent_dim),
        num_levels=int(t.num_levels),
        codebook_size=int(t.codebook_size),
        beta=float(t.beta),
        sinkhorn_epsilon=float(t.sinkhorn_epsilon),
        lr=float(t.lr),
        weight_decay=t.weight_decay,
        reseed_every=t.reseed_every,
        kmeans_init=t.kmeans_init,
        seed=int(cfg.seed),
        mlp_precision=rqvae_precision(cfg),
    )
    module.set_embeddings(x)
    logger = make_logger(cfg, "tokenizer")
    # Weights only (a third of the size with AdamW's moments): the folder is atomic, so a killed run is
    # retrained from scratch, never resumed; the checkpoints keep the best and the last weights.
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", monitor="rqvae/score", mode="min", save_last=True,
                                 filename="best", save_weights_only=True)
    callbacks = [checkpoint]
    if t.coherence_every > 0:
        callbacks.append(CoherenceMonitor(locations, loc_ids, int(t.coherence_every)))
    if t.patience > 0:
        callbacks.append(EarlyStopping(monitor="rqvae/score", mode="min", patience=t.patience, min_delta=t.min_delta))
    # The run's process layout (DDP splits the batches; codebook updates stay in step because k-means and
    # dead-code re-seeding use all embeddings, the same on every rank); tokenizer.progress_bar=false
    # silences this stage alone (tests).
    trainer = make_trainer(cfg, "rqvae", logger=logger, callbacks=callbacks, max_epochs=t.max_epochs, log_every_n_steps=1,
                           deterministic=True, quiet=not t.progress_bar)
    loader = DataLoader(TensorDataset(x), batch_size=int(t.batch_size), shuffle=True, generator=torch.Generator().manual_seed(int(cfg.seed)))
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    train_seconds = time.perf_counter() - t0
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    module.eval()
    with torch.no_grad():
        figures = module.table_figures()
        latents = module.model.encode(x)
        codes, stats = assign_codes(latents, module.model.quantizer, sinkhorn_rounds=t.repair_rounds, seed=int(cfg.seed))
    figures = {k.split("/", 1)[1]: v for k, v in figures.items()}
    _, epochs = fitted_progress(trainer, out / "checkpoints" / "last.ckpt")
    figures.update(epochs=epochs, train_seconds=round(train_seconds, 2), assignment=stats)
    return codes, figures, logger


def run_tokenizer_stage(cfg: RunConfig, force: bool | None = None) -> dict[str, Any]:
    """Run (or skip, when its artefacts match the config) the tokenizer stage.

    Args:
        cfg: The composed config.
        force: Recompute even when the artefacts match (default: ``cfg.force``).
    """
    cfg = load_config(cfg)
    force = cfg.force if force is None else force

    out = tokenizer_dir(cfg)
    fp = tokenizer_fingerprint(cfg)
    if (old := reusable(out, "metrics.json", TOKENIZER_FILES, fp, force, "tokenizer")) is not None:
        return old
    t0 = time.perf_counter()
    if not (data_dir(cfg) / "summary.json").is_file():
        raise DataError(f"{data_dir(cfg)} is not there: run the data stage first (python run.py stage=data ...)")
    locations = pl.read_parquet(data_dir(cfg) / "locations.parquet")
    described = locations.filter(pl.col("description").is_not_null()).sort("loc_id")
    loc_ids = described["loc_id"].to_numpy()
    kind = str(cfg.tokenizer.kind)
    released = released_table(cfg)
    metrics: dict[str, Any] = {"fingerprint": fp, "tokenizer": str(cfg.tokenizer.name), "dataset": str(cfg.data.name)}
    logger = None
    with atomic_dir(out) as tmp:
        if kind == "released":
            if released is None:
                raise DataError(
                    f"tokenizer=released needs {cfg.tokenizer.index_file} in data.root ({cfg.data.root}); "
                    "only the QT-Mob release ships one"
                )
            missing = sorted(set(loc_ids.tolist()) - set(released.loc_ids.tolist()))
            if missing:
                raise DataError(f"the released index has no code for {len(missing)} locations, e.g. {missing[:5]}")
            table = released
        elif kind == "rqvae":
            te = time.perf_counter()
            dtype = embed_dtype(cfg)
            embeddings = embed_texts(
                described["description"].to_list(),
                str(cfg.tokenizer.embedder),
                cfg.llm,
                cfg.paths.cache,
                batch_size=cfg.tokenizer.embed_batch_size,
                max_length=cfg.tokenizer.embed_max_length,
                seed=int(cfg.seed),
                dtype=dtype,
                device=compute_device(str(cfg.trainer.get("accelerator", "auto"))),
                progress=ProgressStyle.from_mapping(vars(cfg.progress)) if cfg.tokenizer.progress_bar else False,
            )
            metrics["embedding_dtype"] = dtype
            metrics["embedding_seconds"] = round(time.perf_counter() - te, 2)
            metrics["embedding_dim"] = int(embeddings.shape[1])
            codes, figures, logger = _train_rqvae(cfg, embeddings, tmp, locations, loc_ids)
            metrics["training"] = figures
            table = CodeTable(loc_ids=loc_ids, codes=codes, codebook_size=int(cfg.tokenizer.codebook_size))
        elif kind in ("id", "random"):
            try:
                table = baseline_table(kind, loc_ids, cfg.tokenizer.num_levels, cfg.tokenizer.codebook_size, cfg.seed)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        else:
            raise DataError(f"tokenizer.kind={kind!r}; choose rqvae, released, id or random")
        metrics.update(coherence(table.codes, locations, table.loc_ids, table.codebook_size))
        if released is not None and kind != "released":
            metrics["released_index"] = coherence(released.codes, locations, released.loc_ids, released.codebook_size)
        table.write_parquet(tmp / "codes.parquet")
        table.to_index_json(tmp / "index.json")
        fig = plot_code_map(table, locations, tmp / "code_map.png", f"{cfg.data.name} / {cfg.tokenizer.name}")
        if logger is not None:
            if hasattr(logger.experiment, "add_figure"):  # TensorBoard (a CSV logger keeps the PNG only)
                logger.experiment.add_figure("rqvae/code_map", fig, global_step=int(metrics["training"]["epochs"]))
            log_run(logger, flat_hparams(as_dict(cfg)),
                    {f"rqvae/{k}": metrics["training"].get(k) for k in ("score", "collision_rate", "recon_all")},
                    step=int(metrics["training"]["epochs"]))
            logger.save()
        # Checked before the folder is renamed into place: a failed tokenizer never looks finished.
        if metrics["collisions"] != 0:
            if kind == "released":
                raise DataError(f"the released index {cfg.tokenizer.index_file} gives {metrics['collisions']} location(s) a code "
                                "that another location has; codes must be unique (use tokenizer=rqvae to learn collision-free ones)")
            raise RuntimeError(f"tokenizer produced {metrics['collisions']} collisions")  # assign_codes guarantees none
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        metrics["manifest"] = file_manifest(tmp, ["codes.parquet", "index.json", "code_map.png"])
        write_json_atomic(tmp / "metrics.json", metrics)
    log.info(
        "tokenizer: %d locations, %d levels x %d codes, collisions %d, level usage %s -> %s",
        len(table), table.num_levels, table.codebook_size, metrics["collisions"], metrics["usage_per_level"], out,
    )
    return metrics
