"""precision=auto / dtype=auto: resolved per machine, and the resolved value keys the artefacts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lightning_modules.hardware as hw
import location_tokenizers.embed as embed
from lightning_modules.align_stage import align_fingerprint, run_precision
from location_tokenizers.rqvae import RQVAE
from location_tokenizers.tokenizer_stage import embed_dtype, rqvae_precision, tokenizer_fingerprint
from tests.conftest import compose_cfg


@pytest.fixture(params=[True, False], ids=["amx", "no-amx"])
def amx(request, monkeypatch) -> bool:
    """Pretend to run on a CPU with (or without) AMX-BF16, and without a GPU."""
    monkeypatch.setattr(hw, "cpu_has_amx_bf16", lambda: request.param)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return request.param


def test_auto_follows_the_cpu(amx) -> None:
    assert hw.resolve_precision("auto", "cpu") == ("bf16-mixed" if amx else "32-true")
    assert hw.resolve_dtype("auto", "cpu") == ("bfloat16" if amx else "float32")
    # accelerator=auto without a GPU is the CPU
    assert hw.resolve_precision("auto", "auto") == hw.resolve_precision("auto", "cpu")


def test_explicit_values_are_kept(amx) -> None:
    for p in ("32-true", "bf16-mixed", "16-mixed"):
        assert hw.resolve_precision(p, "cpu") == p
    for d in ("float32", "bfloat16"):
        assert hw.resolve_dtype(d, "cpu") == d


def test_autocast_dtype() -> None:
    assert hw.autocast_dtype("bf16-mixed") is torch.bfloat16
    assert hw.autocast_dtype("bf16-true") is torch.bfloat16
    assert hw.autocast_dtype("16-mixed") is torch.float16
    assert hw.autocast_dtype("32-true") is None
    a = torch.randn(4, 4)
    with hw.autocast("bf16-mixed"):
        assert (a @ a).dtype == torch.bfloat16
    with hw.autocast("32-true"):
        assert (a @ a).dtype == torch.float32


def test_cpu_probe_answers() -> None:
    assert isinstance(hw.cpu_has_amx_bf16(), bool)


def test_configs_resolve_per_machine(amx) -> None:
    cfg = compose_cfg(["experiment=nyc_qlora_cpu"])
    assert cfg.trainer.precision == "auto" and cfg.tokenizer.embed_dtype == "auto" and cfg.align.compute_dtype == "auto"
    assert run_precision(cfg) == ("bf16-mixed" if amx else "32-true")
    assert embed_dtype(cfg) == ("bfloat16" if amx else "float32")
    assert rqvae_precision(cfg) == ("bf16-mixed" if amx else "32-true")


def test_fingerprints_hold_the_resolved_precision(monkeypatch) -> None:
    """The same config on a machine of another kind computes differently: its artefacts must not be reused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(["experiment=smoke"])
    prints = {}
    for has_amx in (True, False):
        monkeypatch.setattr(hw, "cpu_has_amx_bf16", lambda has_amx=has_amx: has_amx)
        prints[has_amx] = (tokenizer_fingerprint(cfg), align_fingerprint(cfg))
    assert prints[True][0] != prints[False][0] and prints[True][1] != prints[False][1]
    # an explicit setting fingerprints the same on both
    cfg = compose_cfg(["experiment=smoke", "trainer.precision=32-true", "tokenizer.embed_dtype=float32",
                       "tokenizer.precision=32-true", "align.compute_dtype=float32"])
    same = set()
    for has_amx in (True, False):
        monkeypatch.setattr(hw, "cpu_has_amx_bf16", lambda has_amx=has_amx: has_amx)
        same.add((tokenizer_fingerprint(cfg), align_fingerprint(cfg)))
    assert len(same) == 1


def test_bf16_embeddings_cache_apart_and_agree(tmp_path) -> None:
    texts = ["a coffee shop near a park", "a train station in midtown", "a pizza place in brooklyn"]
    assert embed.cache_key("minilm", None, 256) == "minilm-all-MiniLM-L6-v2-256"  # float32 caches keep their name
    assert embed.cache_key("minilm", None, 256, "bfloat16") != embed.cache_key("minilm", None, 256)
    full = embed.embed_texts(texts, "minilm", None, tmp_path, max_length=256, progress=False)
    half = embed.embed_texts(texts, "minilm", None, tmp_path, max_length=256, progress=False, dtype="bfloat16")
    assert half.dtype == np.float32
    assert len(list((tmp_path / "embeddings").glob("*.parquet"))) == 2
    cosine = (full * half).sum(1) / (np.linalg.norm(full, axis=1) * np.linalg.norm(half, axis=1))
    assert cosine.min() > 0.99  # bf16 rounding, not another embedding


def test_bf16_rqvae_mlps_keep_the_quantizer_in_float32() -> None:
    torch.manual_seed(0)
    full = RQVAE(in_dim=48, hidden_dims=[64, 32], latent_dim=8, num_levels=3, codebook_size=8)
    half = RQVAE(in_dim=48, hidden_dims=[64, 32], latent_dim=8, num_levels=3, codebook_size=8, mlp_dtype=torch.bfloat16)
    half.load_state_dict(full.state_dict())
    x = torch.randn(64, 48)
    a, b = full(x, use_sinkhorn=True), half(x, use_sinkhorn=True)
    assert all(b[key].dtype == torch.float32 for key in ("z", "z_q", "recon"))  # float32 again after the MLPs
    assert half.quantizer.codebooks.dtype == torch.float32
    torch.testing.assert_close(b["z"], a["z"], rtol=0.05, atol=0.05)
    # the codes come from float32 distances to the latents; bf16 only moves latents that sit on a boundary
    same = (b["codes"] == a["codes"]).all(1)
    assert same.float().mean() > 0.8
    torch.testing.assert_close(b["recon"][same], a["recon"][same], rtol=0.05, atol=0.05)
    (b["recon_loss"] + b["quant_loss"]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in half.encoder.parameters())


def test_evaluation_decodes_on_the_trainer_device(monkeypatch) -> None:
    from lightning_modules.evaluation import eval_on_gpu

    gpu = compose_cfg(["experiment=nyc_qlora"])   # trainer=gpu: accelerator auto
    cpu = compose_cfg(["experiment=nyc_qlora_cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not eval_on_gpu(gpu) and not eval_on_gpu(cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_on_gpu(gpu) and not eval_on_gpu(cpu)


def test_compute_device_follows_the_accelerator(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {hw.compute_device(a) for a in ("cpu", "auto", "gpu", "cuda")} == {"cpu"}  # no GPU present
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [hw.compute_device(a) for a in ("cpu", "auto", "gpu")] == ["cpu", "cuda", "cuda"]
