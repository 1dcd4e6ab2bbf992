"""Tokens per training sample for each ``data.samples.visit_text``, on the NYC release.

The alignment step's cost grows with its tokens, so the mean sample length under each visit rendering
is the CPU saving the switch offers (feed the two means to ``bench_align.py --seq-len`` for s/step).
Renders the train samples of the next-location and recovery tasks with the released 4x256 index,
tokenizes prompt + response prefix + answer with SmolLM2's tokenizer (numbers split into digits) and
prints the mean and 95th percentile per task, and the tokens of one visit sentence.

Then the whole next-location train epoch under each ``next_format`` (question: one sample per
prefix, the paper's; trajectory: one sample per trajectory chunk): samples, trained targets, tokens
the model reads, and tokens read per trained target, the cost that ``next_format=trajectory`` cuts.

    .venv/bin/python benchmarks/bench_prompts.py [--samples 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import dataclasses

    import numpy as np
    import polars as pl

    from datamodules.prompts import VISIT_TEXT
    from datamodules.rendering import render_samples
    from datamodules.samples import build_sample_index
    from lightning_modules.llm import load_tokenizer
    from location_tokenizers.codes import all_code_tokens
    from pipeline.data import run_data_stage
    from pipeline.paths import data_dir, released_table
    from tests.conftest import NYC_RELEASE, compose_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="seeded train samples per task")
    args = ap.parse_args()
    cfg = compose_run(["experiment=nyc_qlora_cpu", f"data.root={NYC_RELEASE}", f"paths.artifacts={tempfile.mkdtemp()}",
                       "tokenizer=released"])
    run_data_stage(cfg)
    d = data_dir(cfg)
    table = released_table(cfg)
    tok = load_tokenizer(cfg.llm, cfg.paths.cache)
    tok.add_tokens(all_code_tokens(table.num_levels, table.codebook_size))
    checkins, locations = pl.read_parquet(d / "checkins.parquet"), pl.read_parquet(d / "locations.parquet")
    profiles = pl.read_parquet(d / "profiles.parquet")
    base = dataclasses.replace(cfg.data.samples, next_format="question", visit_hints=0)  # the paper's samples, then each switch
    index = build_sample_index(checkins, locations["loc_id"], base, tasks=("next", "recovery_multi", "recovery_single"))
    index = pl.concat([part.sample(min(args.samples, part.height), seed=0)
                       for part in index.filter(pl.col("split") == "train").partition_by("task", maintain_order=True)])
    means: dict[str, dict[str, float]] = {}
    print(f"NYC release, train samples ({args.samples} per task, seeded), SmolLM2 tokens of prompt + prefix + answer")
    print("| visit_text | task | mean tokens | p95 | one visit |\n|---|---|---|---|---|")
    for name, (fmt, sentence) in VISIT_TEXT.items():
        cfg_v = dataclasses.replace(base, visit_text=name)
        out = render_samples(index, checkins, table.strings(), locations, profiles, cfg_v)
        code = table.strings()["code"][0]
        example = sentence.format(time=checkins["local_time"][0].strftime(fmt), user=checkins["user_id"][0], code=code)
        one_visit = len(tok(example, add_special_tokens=False)["input_ids"])
        for (task,), part in out.partition_by("task", as_dict=True, maintain_order=True).items():
            texts = (part["prompt"] + " " + part["response_prefix"] + part["target"]).to_list()
            lengths = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
            means.setdefault(task, {})[name] = float(lengths.mean())
            print(f"| {name} | {task} | {lengths.mean():.0f} | {np.percentile(lengths, 95):.0f} | {one_visit} |", flush=True)
    for task, m in means.items():
        print(f"{task}: compact is {m['compact'] / m['official']:.2f}x the official length")

    print("\nThe next-location train epoch (NYC release)")
    print("| next_format | visit_text | visit_hints | samples | trained targets | tokens read | tokens per target |\n|---|---|---|---|---|---|---|")
    for fmt, visit, hints in (("question", "official", 0), ("question", "compact", 0), ("trajectory", "official", 0),
                              ("trajectory", "compact", 0), ("trajectory", "compact", 3)):
        cfg_v = dataclasses.replace(base, next_format=fmt, visit_text=visit, visit_hints=hints)
        ix = build_sample_index(checkins, locations["loc_id"], cfg_v, tasks=("next",)).filter(pl.col("split") == "train")
        out = render_samples(ix, checkins, table.strings(), locations, profiles, cfg_v)
        targets = int(ix["masked"].list.len().fill_null(1).sum())
        tokens = 0
        for start in range(0, out.height, 4096):
            part = out.slice(start, 4096)
            texts = (part["prompt"] + " " + part["response_prefix"] + part["target"]).to_list()
            tokens += sum(len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"])
        print(f"| {fmt} | {visit} | {hints} | {out.height:,} | {targets:,} | {tokens:,} | {tokens / targets:.0f} |", flush=True)


if __name__ == "__main__":
    main()
