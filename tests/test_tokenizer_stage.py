"""The tokenizer stage end to end (smoke city, tiny random LLM), the module's logging, the
released index, atomic artefacts and determinism."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

import run as run_module
from location_tokenizers.codes import CodeTable
from pipeline.paths import tb_dir
from pipeline.paths import data_dir
from pipeline.paths import tokenizer_dir
from tests.conftest import compose_cfg

FAST = ["tokenizer.max_epochs=15", "tokenizer.progress_bar=false", "tokenizer.hidden_dims=[256,128,64]"]


def smoke_cfg(art, cache, *extra: str):
    return compose_cfg(["experiment=smoke", "stage=tokenizer", f"paths.artifacts={art}", f"paths.cache={cache}", *FAST, *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, model_cache):
    art, cache = tmp_path_factory.mktemp("art"), model_cache
    cfg = smoke_cfg(art, cache)
    metrics = run_module.run(cfg)["tokenizer"]
    return cfg, metrics, art, cache


def test_artefacts_and_zero_collisions(smoke_run) -> None:
    cfg, metrics, _, _ = smoke_run
    out = tokenizer_dir(cfg)
    for name in ("codes.parquet", "index.json", "metrics.json", "code_map.png", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    assert metrics["collisions"] == 0 and metrics["collision_rate"] == 0.0
    table = CodeTable.read_parquet(out / "codes.parquet")
    again = CodeTable.from_index_json(out / "index.json", codebook_size=table.codebook_size)
    assert np.array_equal(table.loc_ids, again.loc_ids) and np.array_equal(table.codes, again.codes)
    locations = pl.read_parquet(data_dir(cfg) / "locations.parquet")
    assert sorted(table.loc_ids.tolist()) == sorted(locations["loc_id"].to_list())
    assert table.codes.shape[1] == 4 and table.codes.max() < 64
    written = json.loads((out / "metrics.json").read_text())
    for key in ("usage_per_level", "perplexity_per_level", "mean_km_same_l1", "mean_km_same_l12", "category_purity_l12", "seconds"):
        assert key in written, key
    assert written["training"]["epochs"] >= 1 and "recon_all" in written["training"]
    assert (out / "code_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_has_rqvae_figures_and_code_map(smoke_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _, _ = smoke_run
    runs = sorted((tb_dir(cfg) / "tokenizer").glob("version_*"))
    assert runs
    acc = EventAccumulator(str(runs[-1]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("rqvae/recon", "rqvae/quant", "rqvae/usage_l0", "rqvae/perplexity_l3", "rqvae/collision_rate",
                "rqvae/km_same_l1", "rqvae/km_same_l12", "rqvae/purity_l12"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "rqvae/code_map" in acc.Tags()["images"]


def test_rerun_skips_and_force_recomputes(smoke_run) -> None:
    cfg, _, art, cache = smoke_run
    codes = tokenizer_dir(cfg) / "codes.parquet"
    before = codes.stat().st_mtime_ns
    run_module.run(smoke_cfg(art, cache))
    assert codes.stat().st_mtime_ns == before
    run_module.run(smoke_cfg(art, cache, "force=true"))
    assert codes.stat().st_mtime_ns != before
    # Another tokenizer config gets its own folder: the first one's codes stay.
    other = smoke_cfg(art, cache, "tokenizer.max_epochs=2")
    run_module.run(other)
    assert tokenizer_dir(other) != tokenizer_dir(cfg) and (tokenizer_dir(other) / "codes.parquet").is_file()
    assert codes.is_file()


def test_same_seed_same_codes(smoke_run, tmp_path) -> None:
    _, _, _, cache = smoke_run
    tables = []
    for name in ("a", "b"):
        cfg = smoke_cfg(tmp_path / name, cache, "tokenizer.max_epochs=5")
        run_module.run(cfg)
        tables.append(CodeTable.read_parquet(tokenizer_dir(cfg) / "codes.parquet"))
    assert np.array_equal(tables[0].codes, tables[1].codes)


def test_failed_stage_leaves_previous_codebook(smoke_run, tmp_path, monkeypatch) -> None:
    import pipeline.tokenizer as stage

    cfg, _, art, cache = smoke_run
    out = tokenizer_dir(cfg)
    before = (out / "codes.parquet").read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("killed during code assignment")

    monkeypatch.setattr(stage, "assign_codes", boom)  # where the stage looks it up
    with pytest.raises(KeyboardInterrupt):
        run_module.run(smoke_cfg(art, cache, "force=true"))
    assert (out / "codes.parquet").read_bytes() == before
    assert not list(out.parent.glob(".tmp-tokenizer-*"))
    # A first run that dies leaves no codebook at all.
    fresh = smoke_cfg(tmp_path, cache, "tokenizer.max_epochs=1")
    with pytest.raises(KeyboardInterrupt):
        run_module.run(fresh)
    assert not tokenizer_dir(fresh).exists()


def test_a_released_index_with_shared_codes_is_never_saved(tmp_path, model_cache, monkeypatch) -> None:
    """Regression: the collision check ran after the folder was renamed into place, so a rerun said
    "skipping" and later stages would have used a tokenizer that had failed."""
    import pipeline.tokenizer as stage
    from datamodules.errors import DataError

    cfg = compose_cfg(["experiment=smoke", "stage=tokenizer", "tokenizer=released", f"paths.artifacts={tmp_path}",
                       f"paths.cache={model_cache}"])
    run_module.run(compose_cfg(["experiment=smoke", "stage=data", f"paths.artifacts={tmp_path}"]))
    loc_ids = pl.read_parquet(data_dir(cfg) / "locations.parquet")["loc_id"].sort().to_numpy()
    codes = np.array([[i // 64, i % 64, 0, 0] for i in range(len(loc_ids))])
    codes[1] = codes[0]  # two locations, one code
    monkeypatch.setattr(stage, "released_table", lambda _cfg: CodeTable(loc_ids=loc_ids, codes=codes, codebook_size=64))
    for _ in range(2):  # the same command again fails again: nothing was saved
        with pytest.raises(DataError, match=r"gives 1 location\(s\) a code that another location has"):
            run_module.run(cfg)
        assert not tokenizer_dir(cfg).exists()


def test_module_logs_table_figures() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_modules.rqvae_module import RQVAEModule

    torch.manual_seed(0)
    centres = torch.randn(12, 32) * 3
    x = centres[torch.randint(0, 12, (240,))] + 0.1 * torch.randn(240, 32)
    module = RQVAEModule(in_dim=32, hidden_dims=[64], latent_dim=8, num_levels=3, codebook_size=8, reseed_every=2, lr=3e-3)
    module.set_embeddings(x)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=64, shuffle=True))
    logged = trainer.callback_metrics
    for key in ("rqvae/recon", "rqvae/quant", "rqvae/usage_l0", "rqvae/perplexity_l2", "rqvae/collision_rate", "rqvae/score"):
        assert key in logged, key
    assert 0.0 <= float(logged["rqvae/collision_rate"]) <= 1.0
    # k-means initialisation spreads 12 well separated clusters over the level-1 codes.
    fresh = RQVAEModule(in_dim=32, hidden_dims=[64], latent_dim=8, num_levels=3, codebook_size=8)
    fresh.set_embeddings(x)
    before = fresh.table_figures()["rqvae/usage_l0"]
    fresh.on_fit_start()
    assert fresh.table_figures()["rqvae/usage_l0"] >= max(before, 6 / 8)


def test_coherence_monitor_sees_spatial_clusters(monkeypatch) -> None:
    """Embeddings that follow three far-apart neighbourhoods: the level-1 groups the monitor logs are
    spatially tight, against the mean distance of random pairs."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_modules.rqvae_module as rqvae_module
    from location_tokenizers.quality import coherence
    from lightning_modules.rqvae_module import CoherenceMonitor, RQVAEModule

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    hood = np.repeat(np.arange(3), 60)
    lat = 40.6 + 0.1 * hood + 0.002 * rng.standard_normal(hood.size)
    lon = -74.0 + 0.1 * hood + 0.002 * rng.standard_normal(hood.size)
    locations = pl.DataFrame({"loc_id": np.arange(hood.size), "lat": lat, "lon": lon, "category": ["Bar", "Café", "Gym"] * 60})
    x = torch.randn(3, 32)[torch.from_numpy(hood)] * 3 + 0.1 * torch.randn(hood.size, 32)
    # A small learning rate keeps the k-means start (one level-1 code per neighbourhood): the test is
    # of the monitor, not of training.
    module = RQVAEModule(in_dim=32, hidden_dims=[64], latent_dim=8, num_levels=2, codebook_size=4, reseed_every=0, lr=1e-5)
    module.set_embeddings(x)
    epochs: list[int] = []

    real = rqvae_module.coherence_arrays

    def spy(*args, **kwargs):
        epochs.append(module.current_epoch + 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rqvae_module, "coherence_arrays", spy)
    trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[CoherenceMonitor(locations, np.arange(hood.size), every=2)])
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=60, shuffle=True))
    assert epochs == [2, 4, 5]  # every 2 epochs, and after the last
    km, purity = float(trainer.callback_metrics["rqvae/km_same_l12"]), float(trainer.callback_metrics["rqvae/purity_l12"])
    random_km = coherence(np.zeros((hood.size, 1), dtype=np.int64), locations, np.arange(hood.size), 4)["mean_km_random"]
    assert km < 0.2 * random_km and 0.0 < purity <= 1.0


def test_released_index_on_nyc(nyc_release, tmp_path) -> None:
    cfg = compose_cfg(
        ["experiment=nyc_qlora", "stage=tokenizer", "tokenizer=released", f"data.root={nyc_release}", f"paths.artifacts={tmp_path}"]
    )
    metrics = run_module.run(cfg)["tokenizer"]
    assert metrics["collisions"] == 0
    assert metrics["usage_per_level"] == [39, 110, 167, 256]
    assert metrics["locations"] == 5_765
    written = json.loads((tokenizer_dir(cfg) / "index.json").read_text())
    released = json.loads((nyc_release / "index_Llama-3.2-1B-Instruct.json").read_text())
    assert written == released


@pytest.mark.parametrize("kind", ["id", "random"])
def test_ablation_tokenizations_are_collision_free(kind, smoke_run) -> None:
    """tokenizer=id (one new token per location) and tokenizer=random (the RQ-VAE's shape, random
    codes) for the tokenization ablation: valid, collision-free, seeded, with their own folder."""
    from location_tokenizers.codes import all_code_tokens

    cfg0, _, art, cache = smoke_run
    plain = lambda *extra: compose_cfg(["experiment=smoke", "stage=tokenizer", f"paths.artifacts={art}", f"paths.cache={cache}", *extra])  # noqa: E731
    cfg = plain(f"tokenizer={kind}")
    metrics = run_module.run(cfg)["tokenizer"]
    assert metrics["collisions"] == 0 and tokenizer_dir(cfg) != tokenizer_dir(cfg0)
    table = CodeTable.read_parquet(tokenizer_dir(cfg) / "codes.parquet")
    n = len(table)
    assert len({tuple(c) for c in table.codes.tolist()}) == n
    if kind == "id":
        assert table.num_levels == 1 and table.codebook_size == n
        assert sorted(table.codes[:, 0].tolist()) == list(range(n))
        assert len(all_code_tokens(table.num_levels, table.codebook_size)) == n
    else:
        assert table.codes.shape == (n, 4) and table.codebook_size == 64
        # Seeded: the same seed draws the same codes, another seed others.
        again = CodeTable.read_parquet(tokenizer_dir(plain(f"tokenizer={kind}")) / "codes.parquet")
        assert np.array_equal(again.codes, table.codes)
        other = plain(f"tokenizer={kind}", "seed=5")
        run_module.run(other)
        assert not np.array_equal(CodeTable.read_parquet(tokenizer_dir(other) / "codes.parquet").codes, table.codes)


def test_purity_hand_case() -> None:
    from location_tokenizers.quality import purity

    # group 0: a a b -> 2 of 3 agree; group 7: c d -> 1 of 2; pooled (2 + 1) / 5
    assert purity(np.array([0, 0, 0, 7, 7]), np.array(["a", "a", "b", "c", "d"])) == pytest.approx(0.6)
    assert purity(np.array([3, 3]), np.array(["x", "x"])) == 1.0 and purity(np.array([], dtype=np.int64), np.array([])) == 0.0
