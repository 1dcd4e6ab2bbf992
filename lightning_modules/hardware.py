"""Numeric precision that suits the machine a run lands on (``precision=auto``, ``dtype=auto``).

bf16 is only a speed-up where the hardware multiplies bf16 matrices natively: CUDA GPUs from Ampere
on, and CPUs with AMX tiles (Intel Sapphire Rapids and later). On other CPUs (e.g. the AMD EPYC these
configs were first tuned on) bf16 is emulated and measured many times slower than float32, so
``auto`` keeps float32 there. Measured on a 2-core Sapphire Rapids VM with SmolLM2-135M:

* description embeddings (forward only, batch 8 x ~545 tokens): float32 670 tok/s, bf16 1,800 tok/s;
* a LoRA training step (batch 8 x 256): bf16 autocast 1.7x faster than float32
  (``benchmarks/bench_align.py``).

The resolved value, not the word ``auto``, goes into the stage fingerprints: the same config run on a
machine of another kind computes in another precision, so its artefacts are not reused for it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=None)
def cpu_has_amx_bf16() -> bool:
    """True when this CPU has AMX-BF16 tiles (oneDNN then runs bf16 matmuls on them)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so guarded
    if probe is not None:
        try:
            return bool(probe())
        except RuntimeError:
            pass
    try:
        return "amx_bf16" in _CPUINFO.read_text().split()
    except OSError:
        return False


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
    return cpu_has_amx_bf16()


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


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved Lightning precision (None: no autocast)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return None


def autocast(precision: str, device_type: str = "cpu") -> torch.autocast:
    """An autocast context for a resolved Lightning precision (disabled for ``32-true``): decoding and
    scoring outside the Trainer compute as training did."""
    dtype = autocast_dtype(precision)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


__all__ = ["autocast", "autocast_dtype", "compute_device", "cpu_has_amx_bf16", "fast_bf16", "resolve_dtype", "resolve_precision"]
