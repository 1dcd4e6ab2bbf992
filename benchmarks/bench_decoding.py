"""Constrained beam search (prefill once, tensor trie masks) against transformers' beam search with
``prefix_allowed_tokens_fn``, on the same model and prompts, side by side in one run.

SmolLM2-135M with the 4x256 code tokens of the released NYC index added, 15 beams, next-location
prompts of the NYC release (chat-formatted, ~600 tokens). Both return the same ranking (tests);
this reports seconds per case and the ratio.

    .venv/bin/python benchmarks/bench_decoding.py [--cases 4] [--beams 15]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import polars as pl
    import torch

    from datamodules.prompts import SYSTEM_PROMPT
    from datamodules.rendering import render_samples
    from lightning_modules.chat_encoding import ChatEncoder
    from lightning_modules.constrained_decoding import beam_search
    from lightning_modules.llm import load_model, load_tokenizer
    from location_tokenizers.codes import all_code_tokens
    from location_tokenizers.trie import CodeTrie
    from pipeline.data import run_data_stage
    from pipeline.paths import data_dir, released_table
    from pipeline.test import test_index
    from tests.conftest import NYC_RELEASE, compose_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--beams", type=int, default=15)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    art = tempfile.mkdtemp()
    cfg = compose_run(["experiment=nyc_qlora_cpu", f"data.root={NYC_RELEASE}", f"paths.artifacts={art}", "tokenizer=released",
                       "data.samples.visit_text=official", "data.samples.next_format=question", "data.samples.visit_hints=0"])
    run_data_stage(cfg)
    table = released_table(cfg)
    tok = load_tokenizer(cfg.llm, cfg.paths.cache)
    tok.add_tokens(all_code_tokens(table.num_levels, table.codebook_size))
    model = load_model(cfg.llm, cfg.paths.cache, dtype=torch.float32).eval()
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    trie = CodeTrie(table, tok, vocab_size=len(tok))
    d = data_dir(cfg)
    index = test_index(cfg).filter(pl.col("task") == "next").head(args.cases)
    samples = render_samples(index, pl.read_parquet(d / "checkins.parquet"), table.strings(), pl.read_parquet(d / "locations.parquet"),
                             pl.read_parquet(d / "profiles.parquet"), cfg.data.samples)
    enc = ChatEncoder(tok, SYSTEM_PROMPT)
    prompts = enc.prompt_texts(samples)
    levels = [trie.level_token_ids[lv].tolist() for lv in range(table.num_levels)]
    prefixes = trie.valid_prefixes()
    code_of = {t: c for row in levels for c, t in enumerate(row)}

    ours_t, hf_t, same, lengths = [], [], 0, []
    for p in prompts:
        batch = enc.prompt_batch([p])
        n = batch["input_ids"].shape[1]
        lengths.append(n)
        t0 = time.perf_counter()
        ours = beam_search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=args.beams)
        ours_t.append(time.perf_counter() - t0)

        def allowed(_: int, sent: torch.Tensor) -> list[int]:
            prefix = tuple(code_of[t] for t in sent[n:].tolist())
            return [levels[len(prefix)][c] for c in prefixes.get(prefix, ())] or [tok.eos_token_id]

        t0 = time.perf_counter()
        out = model.generate(**batch, num_beams=args.beams, num_return_sequences=args.beams, do_sample=False,
                             max_new_tokens=table.num_levels, prefix_allowed_tokens_fn=allowed, length_penalty=0.0,
                             pad_token_id=tok.pad_token_id)
        hf_t.append(time.perf_counter() - t0)
        ref = trie.decode_batch(out[:, n:])
        same += int(torch.equal(ref, ours.loc_ids[0]))
        print(f"prompt {n} tokens: ours {ours_t[-1]:.2f} s, generate {hf_t[-1]:.2f} s, same ranking: {torch.equal(ref, ours.loc_ids[0])}", flush=True)
    o, h = sum(ours_t) / len(ours_t), sum(hf_t) / len(hf_t)
    print(f"\nSmolLM2-135M, {args.beams} beams, {len(prompts)} NYC next-location prompts (mean {sum(lengths) / len(lengths):.0f} tokens), "
          f"{torch.get_num_threads()} threads")
    print(f"ours {o:.2f} s/case, generate(prefix_allowed_tokens_fn) {h:.2f} s/case, ratio {h / o:.1f}x, identical rankings {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
