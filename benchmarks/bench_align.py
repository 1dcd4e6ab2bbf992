"""Seconds per training step and peak memory of the alignment step on this machine.

SmolLM2-135M, batch 8 x 256 tokens (random ids; the last 32 of each row labelled, about a
next-location answer plus some), LoRA r=128/alpha=256 on q,k,v,o, AdamW. Each setting runs in its own
process so that its peak RSS is its own; settings run one after another in one invocation, so
their ratios are comparable even when the machine's absolute speed drifts.

Besides s/step: tokens/s, the matmul work it stands for and that work's share of this CPU's matmul
peak in the step's dtype, measured in the same invocation (2048² matmuls,
``lightning_modules/hardware.py``). The base is frozen, so a step multiplies each token through the
decoder forward and backward for the input gradients only: 4 x decoder parameters per token (2 x in the
forward pass and 2 x for the layers the backward pass reaches, with ``align.lora_layers`` the top ones), plus
4 x vocabulary x width per labelled token for the LM head (applied at labelled positions only);
LoRA's own matmuls and attention scores are left out. (The usual 6 x parameters of full training
would overstate it by half.) ``--seq-len`` sets the row
length, e.g. to the mean sample length of ``data.samples.visit_text=official`` against ``compact``.

    .venv/bin/python benchmarks/bench_align.py [--steps 3] [--llm smollm2_135m] [--only "NAME;NAME"] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = {
    # name: (align overrides, autocast bf16)
    "fp32 LoRA": (["align.quantization=none", "align.gradient_checkpointing=false"], False),
    "bf16-autocast LoRA": (["align.quantization=none", "align.gradient_checkpointing=false"], True),
    # The CPU recipes' setting, then LoRA on SmolLM2's top 10 of 30 layers with no backward pass below them
    # (align.lora_layers): a forward pass plus a third of the backward.
    "fp32 LoRA + checkpointing": (["align.quantization=none", "align.gradient_checkpointing=true"], False),
    "fp32 LoRA top 10 layers + checkpointing": (
        ["align.quantization=none", "align.gradient_checkpointing=true", "align.lora_layers=10"], False),
    "fp32 LoRA top 10 layers": (["align.quantization=none", "align.gradient_checkpointing=false", "align.lora_layers=10"], False),
    "NF4 QLoRA + checkpointing": (["align.quantization=nf4", "align.gradient_checkpointing=true"], False),
    "NF4 QLoRA + checkpointing, bf16 compute": (
        ["align.quantization=nf4", "align.gradient_checkpointing=true", "align.compute_dtype=bfloat16"], True),
}


def one(name: str, steps: int, llm: str, new_tokens: str, seq_len: int = 256) -> dict:
    import torch

    from lightning_modules.alignment_module import AlignmentModule
    from lightning_modules.llm import build_peft_model
    from location_tokenizers.codes import all_code_tokens
    from tests.conftest import compose_run

    overrides, autocast = SETTINGS[name]
    cfg = compose_run([f"llm={llm}", f"align.new_tokens={new_tokens}", *overrides])
    torch.manual_seed(0)
    model, tok, info = build_peft_model(cfg.llm, cfg.align, cfg.paths.cache, all_code_tokens(4, 64), seed=0)
    module = AlignmentModule(model, tasks=["next"])
    model.train()
    ids = torch.randint(0, len(tok), (8, seq_len))
    labels = torch.full_like(ids, -100)
    labels[:, -32:] = ids[:, -32:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "task": ["next"] * 8}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = module.model_step(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    s_per_step = sorted(times[1:])[len(times[1:]) // 2]
    # the decoder's base parameters (4-bit ones counted unpacked), not embeddings, head or adapters
    params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                 for n, p in model.named_parameters()
                 if not any(k in n for k in ("lora_", "modules_to_save", "trainable_tokens", "embed_tokens", "lm_head")))
    head = model.get_output_embeddings().weight.shape.numel()
    # forward 2 x parameters per token; backward 2 x those of the layers it reaches (align.lora_layers: the top ones)
    layers, top = model.get_base_model().config.num_hidden_layers, int(cfg.align.lora_layers)
    back = params * top / layers if top else params
    flops = (2 * params + 2 * back) * ids.numel() + 4 * head * int((labels != -100).sum())
    return {
        "setting": name, "new_tokens": new_tokens, "seq_len": seq_len, "s_per_step": round(s_per_step, 2),
        "tokens_per_s": round(ids.numel() / s_per_step, 1), "model_gflops": round(flops / s_per_step / 1e9, 1),
        "bf16": autocast or "compute_dtype=bfloat16" in " ".join(overrides),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "trainable_params": info["trainable_params"], "loss": round(float(loss), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--llm", default="smollm2_135m")
    ap.add_argument("--new-tokens", default="modules", choices=["modules", "rows"])
    ap.add_argument("--only", help="settings to run, separated by ';' (default: all)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one(args.only, args.steps, args.llm, args.new_tokens, args.seq_len)))
        return
    import torch

    from lightning_modules.hardware import matmul_gflops

    peak = {False: matmul_gflops(torch.float32, n=2048, seconds=0.5), True: matmul_gflops(torch.bfloat16, n=2048, seconds=0.5)}
    rows = []
    for name in args.only.split(";") if args.only else SETTINGS:
        cmd = [sys.executable, __file__, "--child", "--only", name, "--steps", str(args.steps), "--llm", args.llm,
               "--new-tokens", args.new_tokens, "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.llm}, batch 8 x {args.seq_len}, LoRA r=128 on q,k,v,o, new tokens: {args.new_tokens}; "
          f"2048² matmul peak: float32 {peak[False]:.0f}, bf16 {peak[True]:.0f} GFLOP/s")
    print("| setting | s/step | tokens/s | model GFLOP/s | share of peak | peak RSS (GB) | trainable params |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        share = r["model_gflops"] / peak[bool(r["bf16"])]
        print(f"| {r['setting']} | {r['s_per_step']} | {r['tokens_per_s']} | {r['model_gflops']} | {share:.0%} | "
              f"{r['peak_rss_gb']} | {r['trainable_params']:,} |")


if __name__ == "__main__":
    main()
