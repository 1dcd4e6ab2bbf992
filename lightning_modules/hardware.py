"""Numeric precision that suits the machine a run lands on (``precision=auto``, ``dtype=auto``).

bf16 is only a speed-up where the hardware multiplies bf16 matrices natively: CUDA GPUs from Ampere
on, and CPUs with AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16 (AMD EPYC Zen 4). Where
neither flag is present bf16 is emulated and measured many times slower than float32, so ``auto``
keeps float32 there without measuring. Where a flag is present, a flag alone does not say enough
(AVX512-BF16 gains less than AMX, and a VM may hide or throttle units), so ``auto`` times a 1024²
matmul in both dtypes once per machine and picks bf16 when it is at least ``BF16_MIN_SPEEDUP`` times
faster; the figures are cached (``cpu-bf16.json`` beside the model cache) so that every run
on the machine decides the same way. Measured on 2-core VMs:

* AMD EPYC with AVX512-BF16, no AMX: 2048² matmul 413 GFLOP/s in bf16 against 188 in float32
  (``benchmarks/bench_precision.py``), and the quick start in 4 min 19 s instead of 5 min 51 s;
* Sapphire Rapids with AMX, SmolLM2-135M description embeddings: float32 670 tok/s, bf16 1,800 tok/s,
  and a LoRA training step 1.7x faster under bf16 autocast (``benchmarks/bench_align.py``);
* AMD EPYC with AVX2 only: bf16 autocast had not finished 4 alignment steps when float32 had done 20.

The resolved value, not the word ``auto``, goes into the stage fingerprints: the same config run on a
machine of another kind computes in another precision, so its artefacts are not reused for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from datamodules.artifacts import write_json_atomic

log = logging.getLogger(__name__)

_CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matmul units; without one, bf16 is emulated
BF16_MIN_SPEEDUP = 1.3  # measured: 2.2x with AVX512-BF16, more with AMX, <0.1x emulated
_MATMUL_N = 1024


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16 tiles (oneDNN then runs bf16 matmuls on them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    return "amx_bf16" in _cpu_description()[1]


@functools.lru_cache(maxsize=None)
def _cpu_description() -> tuple[str, frozenset[str]]:
    """(model name, flags) of this CPU from /proc/cpuinfo; empty where it cannot be read."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return platform.processor() or "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_bf16_flags() -> list[str]:
    """The native bf16 units this CPU reports (``amx_bf16``, ``avx512_bf16``)."""
    found = set(_cpu_description()[1])
    if cpu_has_amx_bf16():
        found.add("amx_bf16")
    return [f for f in BF16_FLAGS if f in found]


def matmul_gflops(dtype: torch.dtype, n: int = _MATMUL_N, seconds: float = 0.25, rounds: int = 3) -> float:
    """Best-of-``rounds`` GFLOP/s of an n x n matmul in ``dtype`` on this CPU's threads."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b  # kernels and allocator warm
    best = 0.0
    for _ in range(rounds):
        count, t0 = 0, time.perf_counter()
        while True:
            a @ b
            count += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                break
        best = max(best, 2 * n**3 * count / elapsed / 1e9)
    return best


def _cache_file() -> Path:
    """``$QTMOB_CACHE`` (the default of ``paths.cache``) or ``$XDG_CACHE_HOME/qtmob``: a per-machine fact."""
    root = os.environ.get("QTMOB_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtmob")
    return Path(root) / "cpu-bf16.json"


def _machine_key(model: str, flags: list[str]) -> str:
    """What the measurement depends on: the CPU, its bf16 units, torch and the thread count."""
    raw = json.dumps([model, flags, torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def cpu_bf16_measurement() -> dict:
    """Whether bf16 matmuls are fast on this CPU, with the figures behind the answer.

    No bf16 unit: ``fast`` is False, nothing is timed. Otherwise a cached measurement for this
    (CPU, torch, threads) is used, or made (about 2 s) and cached.
    """
    model, _ = _cpu_description()
    flags = cpu_bf16_flags()
    if not flags:
        return {"fast": False, "cpu": model, "flags": [], "reason": "no native bf16 unit (bf16 would be emulated)"}
    key, path = _machine_key(model, flags), _cache_file()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and isinstance(cached.get("fast"), bool):
            return cached
    except (OSError, ValueError):
        pass  # no cache yet, or one from an interrupted write elsewhere: measure again
    f32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    result = {
        "key": key, "cpu": model, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "matmul_n": _MATMUL_N, "float32_gflops": round(f32, 1), "bfloat16_gflops": round(bf16, 1),
        "speedup": round(bf16 / f32, 2), "min_speedup": BF16_MIN_SPEEDUP, "fast": bf16 >= BF16_MIN_SPEEDUP * f32,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    log.info("precision=auto: a %dx%d matmul runs at %.0f GFLOP/s in bf16 and %.0f in float32 on this CPU (%s, %s): "
             "%s; cached in %s", _MATMUL_N, _MATMUL_N, bf16, f32, model, ", ".join(flags),
             "bf16" if result["fast"] else "float32", path)
    try:
        write_json_atomic(path, result)
    except OSError as err:  # a read-only home still gets the answer, measured once per process
        log.warning("could not cache the bf16 measurement in %s: %s", path, err)
    return result


def cpu_bf16_is_fast() -> bool:
    """True when this CPU multiplies bf16 matrices at least ``BF16_MIN_SPEEDUP`` x faster than float32."""
    return bool(cpu_bf16_measurement()["fast"])


def _gpu_will_be_used(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def compute_device(accelerator: str = "cpu") -> str:
    """``cuda`` when ``accelerator`` resolves to a GPU that is present, else ``cpu``: where work done
    outside the Trainer (description embeddings) runs."""
    return "cuda" if _gpu_will_be_used(accelerator) and torch.cuda.is_available() else "cpu"


def fast_bf16(accelerator: str = "cpu") -> bool:
    """Whether bf16 compute is faster than float32 on the device ``accelerator`` resolves to."""
    if _gpu_will_be_used(accelerator):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_bf16_is_fast()


def resolve_precision(precision: str | int, accelerator: str = "cpu") -> str:
    """Lightning ``precision``: ``auto`` becomes ``bf16-mixed`` where bf16 is fast, else ``32-true``;
    any other value is returned unchanged."""
    if str(precision) != "auto":
        return str(precision)
    return "bf16-mixed" if fast_bf16(accelerator) else "32-true"


def resolve_dtype(name: str, accelerator: str = "cpu") -> str:
    """A dtype name (``float32``, ``bfloat16``, ...): ``auto`` becomes ``bfloat16`` where bf16 is fast,
    else ``float32``."""
    if str(name) != "auto":
        return str(name)
    return "bfloat16" if fast_bf16(accelerator) else "float32"


def resolve_quantization(kind: str, accelerator: str = "auto") -> str:
    """``align.quantization``: ``auto`` becomes ``nf4`` (QLoRA, the paper's) where training runs on a GPU
    and ``none`` (plain LoRA) on a CPU; any other value is returned unchanged.

    On CPUs NF4 saves memory but not time: bitsandbytes dequantises every weight at every matmul.
    SmolLM2-135M, batch 8 x 256 (``benchmarks/bench_align.py``), 2-core AMD EPYC with AVX512-BF16:
    bf16 LoRA 5.59 s/step (5.1 GB), NF4 with bf16 compute 8.50 s/step (3.1 GB); float32 LoRA 7.89 s
    (6.9 GB), NF4 8.65 s (3.5 GB). AVX2-only EPYC (float32): LoRA 17.1 s, NF4 20.8 s.
    """
    if str(kind) != "auto":
        return str(kind)
    return "nf4" if _gpu_will_be_used(accelerator) and torch.cuda.is_available() else "none"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved Lightning precision (None: no autocast)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return None


def resident_mb() -> float:
    """This process's resident memory now, in MB (Linux; 0 where /proc is absent)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_memory() -> None:
    """Free what a finished stage left behind and give the freed heap back to the system.

    A stage's model, optimizer state and tensors are unreachable once it returns, but reference cycles
    (Trainer <-> LightningModule) wait for the cycle collector, and glibc keeps freed pages for reuse
    rather than returning them; the next stage's peak then stacks on the last one's. ``malloc_trim`` is
    glibc's; elsewhere only the collection runs."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def autocast(precision: str, device_type: str = "cpu") -> torch.autocast:
    """An autocast context for a resolved Lightning precision (disabled for ``32-true``): decoding and
    scoring outside the Trainer compute as training did."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


__all__ = [
    "autocast", "autocast_dtype", "compute_device", "cpu_bf16_flags", "cpu_bf16_is_fast", "cpu_bf16_measurement",
    "cpu_has_amx_bf16", "fast_bf16", "matmul_gflops", "release_memory", "resident_mb", "resolve_dtype", "resolve_precision",
    "resolve_quantization",
]
