"""``stage=tokenizer``: description embeddings → RQ-VAE → collision-free location codes.

Writes ``<paths.artifacts>/<data.name>/tokenizer/`` atomically (a killed run leaves no codebook a
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
from omegaconf import DictConfig, OmegaConf

from datamodules.artifacts import atomic_dir, file_manifest, fingerprint, reusable, tb_dir, write_json_atomic
from datamodules.data_stage import data_dir, data_fingerprint, run_data_stage
from datamodules.errors import DataError
from location_tokenizers.codes import CodeTable
from location_tokenizers.quality import coherence

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("codes.parquet", "index.json", "metrics.json", "code_map.png")


def tokenizer_dir(cfg: DictConfig) -> Path:
    """``<paths.artifacts>/<data.name>/tokenizer-<tokenizer.name>-<fingerprint>``: one folder per
    tokenizer config, so that a grid over codebook shapes never mixes up codes."""
    return Path(cfg.paths.artifacts) / str(cfg.data.name) / f"tokenizer-{cfg.tokenizer.name}-{tokenizer_fingerprint(cfg)[:8]}"


def tokenizer_fingerprint(cfg: DictConfig) -> str:
    """Everything that determines the codes: data, tokenizer settings, embedder model, seed."""
    tok = {k: v for k, v in OmegaConf.to_container(cfg.tokenizer, resolve=True).items() if k != "progress_bar"}
    # resolved: `auto` computes in another dtype on another machine
    tok["embed_dtype"], tok["precision"] = embed_dtype(cfg), rqvae_precision(cfg)
    llm = OmegaConf.to_container(cfg.llm, resolve=True) if tok.get("embedder") == "llm" else None
    return fingerprint({"data": data_fingerprint(cfg), "tokenizer": tok, "llm": llm, "seed": int(cfg.seed)})


def embed_dtype(cfg: DictConfig) -> str:
    """The dtype the description encoder runs in (``tokenizer.embed_dtype=auto`` resolved here)."""
    from lightning_modules.hardware import resolve_dtype

    return resolve_dtype(str(cfg.tokenizer.get("embed_dtype", "float32")), str(cfg.trainer.accelerator))


def rqvae_precision(cfg: DictConfig) -> str:
    """The precision of the RQ-VAE's MLPs (``tokenizer.precision=auto`` resolved here)."""
    from lightning_modules.hardware import resolve_precision

    return resolve_precision(str(cfg.tokenizer.get("precision", "32-true")), str(cfg.trainer.accelerator))


def load_codes(cfg: DictConfig) -> CodeTable:
    """The code table of a finished tokenizer stage."""
    path = tokenizer_dir(cfg) / "codes.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: run the tokenizer stage first (python run.py stage=tokenizer ...)")
    return CodeTable.read_parquet(path)


def released_table(cfg: DictConfig) -> CodeTable | None:
    """The release's own index, if the data folder has one."""
    root = cfg.data.get("root")
    name = cfg.tokenizer.get("index_file") or "index_Llama-3.2-1B-Instruct.json"
    if not root:
        return None
    path = Path(str(root)) / str(name)
    return CodeTable.from_index_json(path) if path.is_file() else None


def plot_code_map(table: CodeTable, locations: pl.DataFrame, path: Path, title: str):
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


def _train_rqvae(cfg: DictConfig, embeddings: np.ndarray, out: Path, locations: pl.DataFrame,
                 loc_ids: np.ndarray) -> tuple[CodeTable | None, dict[str, Any], Any]:
    """Fit the RQ-VAE and assign codes. Returns the table (loc ids filled by the caller), figures, logger.

    ``loc_ids`` is the row order of ``embeddings``; with ``locations`` it gives the coherence figures
    logged every ``tokenizer.coherence_every`` epochs."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_modules.dashboards import tensorboard_logger
    from lightning_modules.distributed import ForkSafeThreads
    from lightning_modules.progress import ProgressStyle
    from lightning_modules.rqvae_module import CoherenceMonitor, RQVAEModule
    from location_tokenizers.assign import assign_codes

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
        weight_decay=float(t.get("weight_decay", 1e-4)),
        reseed_every=int(t.get("reseed_every", 20)),
        kmeans_init=bool(t.get("kmeans_init", True)),
        seed=int(cfg.seed),
        mlp_precision=rqvae_precision(cfg),
    )
    module.set_embeddings(x)
    logger = tensorboard_logger(tb_dir(cfg), "tokenizer")
    # tokenizer.progress_bar=false silences this stage alone (tests); else the run's progress style.
    style = ProgressStyle.from_mapping(cfg.get("progress")) if bool(t.get("progress_bar", True)) else ProgressStyle("none")
    progress = style.trainer_kwargs("rqvae")
    # Weights only (a third of the size with AdamW's moments): the folder is atomic, so a killed run is
    # retrained from scratch, never resumed; the checkpoints keep the best and the last weights.
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", monitor="rqvae/score", mode="min", save_last=True,
                                 filename="best", save_weights_only=True)
    callbacks = [checkpoint, ForkSafeThreads(), *progress.pop("callbacks")]
    if int(t.get("coherence_every", 0)) > 0:
        callbacks.append(CoherenceMonitor(locations, loc_ids, int(t.coherence_every)))
    if int(t.get("patience", 0)) > 0:
        callbacks.append(EarlyStopping(monitor="rqvae/score", mode="min", patience=int(t.patience), min_delta=float(t.get("min_delta", 1e-4))))
    trainer = L.Trainer(
        max_epochs=int(t.max_epochs),
        accelerator=str(cfg.trainer.accelerator),
        # The trainer's process layout (DDP splits the batches; codebook updates stay in step because
        # k-means and dead-code re-seeding use all embeddings, the same on every rank).
        devices=cfg.trainer.devices,
        strategy=cfg.trainer.get("strategy", "auto"),
        num_nodes=int(cfg.trainer.get("num_nodes", 1)),
        logger=logger,
        callbacks=callbacks,
        **progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )
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
        codes, stats = assign_codes(latents, module.model.quantizer, sinkhorn_rounds=int(t.get("repair_rounds", 20)), seed=int(cfg.seed))
    figures = {k.split("/", 1)[1]: v for k, v in figures.items()}
    from lightning_modules.align_stage import fitted_progress

    _, epochs = fitted_progress(trainer, out / "checkpoints" / "last.ckpt")
    figures.update(epochs=epochs, train_seconds=round(train_seconds, 2), assignment=stats)
    return codes, figures, logger


def baseline_table(kind: str, loc_ids: np.ndarray, cfg: DictConfig) -> CodeTable:
    """The non-semantic tokenizations of the ablation grid.

    * ``id``: one new token per location (a single level whose codebook is the catalogue), as in
      LLM recommenders that add an ID token per item;
    * ``random``: ``num_levels x codebook_size`` codes drawn uniformly without collisions (seeded):
      the RQ-VAE's shape with none of its semantics, so shared prefixes mean nothing.
    """
    n = len(loc_ids)
    if kind == "id":
        return CodeTable(loc_ids=loc_ids, codes=np.arange(n, dtype=np.int64)[:, None], codebook_size=max(n, 1))
    levels, k = int(cfg.tokenizer.num_levels), int(cfg.tokenizer.codebook_size)
    if k**levels < n:
        raise DataError(f"tokenizer=random: {levels} levels x {k} codes give {k**levels} codes for {n} locations")
    rng = np.random.default_rng(int(cfg.seed))
    flat: np.ndarray = np.empty(0, dtype=np.int64)
    while len(flat) < n:  # rejection of duplicates; K**L is far above n in practice
        draw = rng.integers(0, k**levels, size=2 * (n - len(flat)), dtype=np.int64)
        flat = np.concatenate([flat, draw])
        _, first = np.unique(flat, return_index=True)
        flat = flat[np.sort(first)]
    flat = flat[:n]
    codes = np.stack([(flat // k ** (levels - 1 - lv)) % k for lv in range(levels)], axis=1)
    return CodeTable(loc_ids=loc_ids, codes=codes, codebook_size=k)


def run_tokenizer_stage(cfg: DictConfig, force: bool | None = None) -> dict[str, Any]:
    """Run (or skip, when its artefacts match the config) the tokenizer stage.

    Args:
        cfg: The composed config.
        force: Recompute even when the artefacts match (default: ``cfg.force``). Later stages
            pass False: ``force`` applies to the stage that was asked for.
    """
    force = bool(cfg.get("force", False)) if force is None else force
    from lightning_modules.dashboards import flat_hparams, log_run
    from lightning_modules.hardware import compute_device
    from lightning_modules.progress import ProgressStyle
    from location_tokenizers.embed import embed_texts

    # The data it needs: reused when present (force applies to this stage, not again to data).
    run_data_stage(cfg, force=False)
    out = tokenizer_dir(cfg)
    fp = tokenizer_fingerprint(cfg)
    if (old := reusable(out, "metrics.json", TOKENIZER_FILES, fp, force, "tokenizer")) is not None:
        return old
    t0 = time.perf_counter()
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
                    f"tokenizer=released needs {cfg.tokenizer.index_file} in data.root ({cfg.data.get('root')}); "
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
                batch_size=int(cfg.tokenizer.get("embed_batch_size", 8)),
                max_length=int(cfg.tokenizer.get("embed_max_length", 1024)),
                seed=int(cfg.seed),
                dtype=dtype,
                device=compute_device(str(cfg.trainer.accelerator)),
                progress=ProgressStyle.from_mapping(cfg.get("progress")) if bool(cfg.tokenizer.get("progress_bar", True)) else False,
            )
            metrics["embedding_dtype"] = dtype
            metrics["embedding_seconds"] = round(time.perf_counter() - te, 2)
            metrics["embedding_dim"] = int(embeddings.shape[1])
            codes, figures, logger = _train_rqvae(cfg, embeddings, tmp, locations, loc_ids)
            metrics["training"] = figures
            table = CodeTable(loc_ids=loc_ids, codes=codes, codebook_size=int(cfg.tokenizer.codebook_size))
        elif kind in ("id", "random"):
            table = baseline_table(kind, loc_ids, cfg)
        else:
            raise DataError(f"tokenizer.kind={kind!r}; choose rqvae, released, id or random")
        metrics.update(coherence(table.codes, locations, table.loc_ids, table.codebook_size))
        if released is not None and kind != "released":
            metrics["released_index"] = coherence(released.codes, locations, released.loc_ids, released.codebook_size)
        table.write_parquet(tmp / "codes.parquet")
        table.to_index_json(tmp / "index.json")
        fig = plot_code_map(table, locations, tmp / "code_map.png", f"{cfg.data.name} / {cfg.tokenizer.name}")
        if logger is not None:
            logger.experiment.add_figure("rqvae/code_map", fig, global_step=int(metrics["training"]["epochs"]))
            log_run(logger, flat_hparams(OmegaConf.to_container(cfg, resolve=True)),
                    {f"rqvae/{k}": metrics["training"].get(k) for k in ("score", "collision_rate", "recon_all")},
                    step=int(metrics["training"]["epochs"]))
            logger.experiment.flush()
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
