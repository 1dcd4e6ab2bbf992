"""precision=auto / dtype=auto: resolved per machine, and the resolved value keys the artefacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lightning_modules.hardware as hw
import lightning_modules.embed as embed
from pipeline.paths import align_fingerprint, run_precision
from location_tokenizers.rqvae import RQVAE
from pipeline.paths import embed_dtype, rqvae_precision, tokenizer_fingerprint
from tests.conftest import compose_cfg


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "float32-cpu"])
def amx(request, monkeypatch) -> bool:
    """Pretend to run on a CPU where bf16 is (or is not) fast, and without a GPU."""
    monkeypatch.setattr(hw, "cpu_bf16_is_fast", lambda: request.param)
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
    assert set(hw.cpu_bf16_flags()) <= set(hw.BF16_FLAGS)


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU of chosen flags and matmul speeds; the measurement cache in a temporary folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QTMOB_CACHE", raising=False)
    hw.cpu_bf16_measurement.cache_clear()
    calls: list[torch.dtype] = []
    state = {"flags": "fpu avx2", "gflops": {torch.float32: 181.0, torch.bfloat16: 601.0}}

    def describe():
        return "Test CPU", frozenset(state["flags"].split())

    def timed(dtype, *a, **k):
        calls.append(dtype)
        return state["gflops"][dtype]

    monkeypatch.setattr(hw, "_cpu_description", describe)
    monkeypatch.setattr(hw, "cpu_has_amx_bf16", lambda: "amx_bf16" in state["flags"].split())
    monkeypatch.setattr(hw, "matmul_gflops", timed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield state, calls, tmp_path / "qtmob" / "cpu-bf16.json"
    hw.cpu_bf16_measurement.cache_clear()


def test_a_cpu_without_bf16_units_stays_float32_untimed(fake_cpu) -> None:
    state, calls, cache = fake_cpu
    assert hw.resolve_precision("auto") == "32-true" and hw.resolve_dtype("auto") == "float32"
    assert calls == [] and not cache.exists()  # emulated bf16 is never timed (it would take seconds)


@pytest.mark.parametrize("flags", ["avx512f avx512_bf16", "amx_tile amx_bf16"])
def test_a_bf16_cpu_is_decided_by_a_cached_measurement(fake_cpu, flags) -> None:
    state, calls, cache = fake_cpu
    state["flags"] = flags
    assert hw.resolve_precision("auto") == "bf16-mixed" and hw.resolve_dtype("auto") == "bfloat16"
    assert calls == [torch.float32, torch.bfloat16]
    saved = json.loads(cache.read_text())
    assert saved["fast"] is True and saved["speedup"] == pytest.approx(601 / 181, abs=0.01)
    assert saved["flags"] == [flags.split()[-1]] and saved["cpu"] == "Test CPU"
    # a new process on the same machine reads the answer instead of timing again
    hw.cpu_bf16_measurement.cache_clear()
    assert hw.fast_bf16("cpu") and len(calls) == 2


def test_a_bf16_unit_that_does_not_pay_keeps_float32(fake_cpu) -> None:
    state, calls, cache = fake_cpu
    state["flags"] = "avx512_bf16"
    state["gflops"] = {torch.float32: 180.0, torch.bfloat16: 200.0}  # 1.1x: casts would eat it
    assert hw.resolve_precision("auto") == "32-true"
    assert json.loads(cache.read_text())["fast"] is False


def test_the_cache_of_another_machine_or_a_broken_one_is_measured_again(fake_cpu) -> None:
    state, calls, cache = fake_cpu
    state["flags"] = "avx512_bf16"
    cache.parent.mkdir(parents=True)
    cache.write_text('{"key": "another machine", "fast": false}')
    assert hw.fast_bf16("cpu") and len(calls) == 2
    hw.cpu_bf16_measurement.cache_clear()
    cache.write_text('{"key": ')  # cut short
    assert hw.fast_bf16("cpu") and len(calls) == 4
    assert json.loads(cache.read_text())["fast"] is True


def test_an_unwritable_cache_still_answers(fake_cpu, monkeypatch, caplog) -> None:
    state, calls, cache = fake_cpu
    state["flags"] = "avx512_bf16"

    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(hw, "write_json_atomic", refuse)
    assert hw.fast_bf16("cpu") and "could not cache" in caplog.text


def test_the_matmul_timer_measures_this_cpu() -> None:
    f32 = hw.matmul_gflops(torch.float32, n=256, seconds=0.02, rounds=1)
    assert 0.1 < f32 < 1e5  # GFLOP/s of a real multiplication, whatever the machine


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
        monkeypatch.setattr(hw, "cpu_bf16_is_fast", lambda has_amx=has_amx: has_amx)
        prints[has_amx] = (tokenizer_fingerprint(cfg), align_fingerprint(cfg))
    assert prints[True][0] != prints[False][0] and prints[True][1] != prints[False][1]
    # an explicit setting fingerprints the same on both
    cfg = compose_cfg(["experiment=smoke", "trainer.precision=32-true", "tokenizer.embed_dtype=float32",
                       "tokenizer.precision=32-true", "align.compute_dtype=float32"])
    same = set()
    for has_amx in (True, False):
        monkeypatch.setattr(hw, "cpu_bf16_is_fast", lambda has_amx=has_amx: has_amx)
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
    from pipeline.test import eval_on_gpu

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


def test_quantization_auto_is_qlora_on_a_gpu_and_lora_on_a_cpu(monkeypatch) -> None:
    from pipeline.paths import align_fingerprint
    from lightning_modules.llm import align_quantization

    cfg = compose_cfg(["experiment=nyc_qlora"])
    assert cfg.align.quantization == "auto"
    prints = {}
    for gpu in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert align_quantization(cfg.align) == ("nf4" if gpu else "none")
        assert hw.resolve_quantization("auto", "cpu") == "none"  # a CPU trainer on a GPU machine too
        for explicit in ("nf4", "int8", "none"):
            assert hw.resolve_quantization(explicit, "auto") == explicit
        prints[gpu] = align_fingerprint(compose_cfg(["experiment=smoke", "align.quantization=auto"]))
    assert prints[True] != prints[False]  # the resolved value keys the aligned model


def test_release_memory_frees_what_a_finished_stage_left_in_a_cycle() -> None:
    """A stage's objects often sit in reference cycles (Trainer <-> LightningModule) that plain reference
    counting never frees; run.py calls release_memory between stages so the next peak does not stack."""
    import gc

    import numpy as np

    from lightning_modules.hardware import release_memory, resident_mb

    class Holder:
        pass

    gc.disable()  # as if the collector had not come round yet
    try:
        holder = Holder()
        holder.me, holder.data = holder, np.ones(300 * 2**20 // 8)  # 300 MB in a reference cycle
        before = resident_mb()
        del holder
        assert resident_mb() > before - 50, "a cycle is not freed by reference counting"
        release_memory()
        assert resident_mb() < before - 250
    finally:
        gc.enable()
