"""What ``precision=auto`` decides on this machine, and the matmul speeds behind the decision.

Times n x n matmuls in float32 and bf16 side by side (best of 3 rounds each, interleaved, so that a
drift of the machine's speed hits both), prints the CPU's bf16 units and the decision that
``lightning_modules/hardware.py`` takes (and caches) for ``precision=auto``. The float32 and bf16
figures are also the FLOP-bound peaks against which ``bench_align.py`` reports its share.

    .venv/bin/python benchmarks/bench_precision.py [--sizes 512 1024 2048] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    import lightning_modules.hardware as hw

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--seconds", type=float, default=0.5, help="per round and dtype")
    args = ap.parse_args()
    model, _ = hw._cpu_description()
    flags = hw.cpu_bf16_flags()
    print(f"CPU: {model}; bf16 units: {', '.join(flags) or 'none (bf16 is emulated)'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| n | float32 GFLOP/s | bf16 GFLOP/s | bf16 / float32 |\n|---|---|---|---|")
    for n in args.sizes:
        best = {torch.float32: 0.0, torch.bfloat16: 0.0}
        for _ in range(3):
            for dtype in best:
                best[dtype] = max(best[dtype], hw.matmul_gflops(dtype, n=n, seconds=args.seconds, rounds=1))
        f32, bf16 = best[torch.float32], best[torch.bfloat16]
        print(f"| {n} | {f32:.0f} | {bf16:.0f} | {bf16 / f32:.2f} |", flush=True)
    decision = hw.cpu_bf16_measurement()
    print(f"\nprecision=auto on this CPU: {hw.resolve_precision('auto', 'cpu')} "
          f"(bf16 when a {hw._MATMUL_N}² matmul is >= {hw.BF16_MIN_SPEEDUP}x faster)")
    print(json.dumps(decision))


if __name__ == "__main__":
    main()
