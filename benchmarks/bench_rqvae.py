"""Seconds per RQ-VAE training epoch at NYC size, float32 MLPs against bf16-autocast MLPs, side by side.

5,765 random "embeddings" of SmolLM2's width (576), the official 4 x 64 RQ-VAE (MLP
2048-1024-512-256-128-64, latent 32), batch 512, fused AdamW, Sinkhorn on the last level: the training
loop of ``RQVAEModule`` without Lightning. The settings alternate epoch by epoch, so machine drift
hits both alike; the median epoch of each is reported.

    .venv/bin/python benchmarks/bench_rqvae.py [--epochs 5] [--dim 576] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from location_tokenizers.rqvae import RQVAE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--n", type=int, default=5765)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0))
    settings = {"float32": None, "bf16 MLPs": torch.bfloat16}
    models, opts, times = {}, {}, {name: [] for name in settings}
    for name, dtype in settings.items():
        torch.manual_seed(0)
        models[name] = RQVAE(in_dim=args.dim, mlp_dtype=dtype)
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3, fused=True)  # as RQVAEModule
    for _ in range(args.epochs + 1):  # the first epoch warms up kernels and allocators
        for name in settings:
            model, opt = models[name], opts[name]
            t0 = time.perf_counter()
            for i in range(0, args.n, 512):
                out = model(x[i : i + 512], use_sinkhorn=True)
                opt.zero_grad(set_to_none=True)
                (out["recon_loss"] + out["quant_loss"]).backward()
                opt.step()
            times[name].append(time.perf_counter() - t0)
    print(f"RQ-VAE 4x64, {args.n} x {args.dim}, batch 512, {torch.get_num_threads()} threads")
    print("| MLPs | s/epoch (median) |\n|---|---|")
    for name in settings:
        print(f"| {name} | {statistics.median(times[name][1:]):.2f} |")


if __name__ == "__main__":
    main()
