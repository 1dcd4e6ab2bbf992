"""Test-time decoding with and without ``eval.share_prefix``, side by side on one aligned model.

``share_prefix=true`` prefills the tokens every prompt shares (chat header, system text) once per run,
and batches prompts that share a longer prefix (a user's memory or profile) together, prefilling it once;
``false`` is the previous path: length-sorted batches, every prompt prefilled whole. The two are
timed in alternation (A B A B ...) on the same cases, and the rankings compared.

Give the overrides of a run whose alignment is finished (the same ones, with the same
``QTMOB_ARTIFACTS``):

    .venv/bin/python benchmarks/bench_test_prefix.py experiment=quickstart [--cases 50] [--rounds 2]

Prints seconds per case for both, the ratio, the prompt tokens each prefilled and whether the
top-10 rankings are identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import numpy as np
    import torch

    from lightning_modules.ranking import rank_prompts
    from location_tokenizers.codes import CodeTable
    from pipeline.paths import read_data, run_dir, run_precision
    from pipeline.test import load_for_eval, test_prompts
    from tests.conftest import compose_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--cases", type=int, default=50, help="the first N test cases (of eval.max_cases)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating timed rounds of each")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cfg = compose_run(args.overrides)
    folder = run_dir(cfg) / "model"
    if not (folder / "qtmob.json").is_file():
        sys.exit(f"error: {folder} has no aligned model: run `python run.py {' '.join(args.overrides)} stage=align` first")
    table = CodeTable.read_parquet(folder / "codes.parquet")
    model, _, encoder, trie, _ = load_for_eval(cfg, folder, table)
    _, prompts, _ = test_prompts(cfg, table, encoder, read_data(cfg, "checkins.parquet"))
    prompts = prompts[: args.cases]
    e, precision = cfg.eval, run_precision(cfg)

    fed: list[int] = []
    embed = model.get_input_embeddings()
    embed.register_forward_hook(lambda _m, a, _o: fed.append(int(a[0].numel())))
    step_tokens = int(e.num_beams) * int(e.batch_size)  # a beam step feeds at most one token per beam
    seconds: dict[bool, list[float]] = {True: [], False: []}
    ranked: dict[bool, np.ndarray] = {}
    tokens: dict[bool, int] = {}
    for _ in range(args.rounds):
        for share in (False, True):
            fed.clear()
            t0 = time.perf_counter()
            locs, _ = rank_prompts(model, encoder, trie, prompts, int(e.num_beams), int(e.batch_size), precision=precision,
                                   share_prefix=share, code_softmax=cfg.align.code_softmax)
            seconds[share].append(time.perf_counter() - t0)
            ranked[share] = locs[:, : int(e.top_k)]
            tokens[share] = sum(n for n in fed if n > step_tokens)
    n = len(prompts)
    lengths = [len(r) for r in encoder.prompt_ids(prompts)]
    print(f"{n} test cases of {' '.join(args.overrides) or 'the default run'}; prompts of {np.mean(lengths):.0f} tokens "
          f"on average; batch {e.batch_size}, {e.num_beams} beams, precision {precision}, {torch.get_num_threads()} threads")
    for share in (False, True):
        best = min(seconds[share])
        print(f"  share_prefix={str(share).lower():5}  {best / n:.3f} s/case (best of {args.rounds}; all: "
              f"{', '.join(f'{s / n:.3f}' for s in seconds[share])})  prefill tokens {tokens[share]:,}")
    print(f"  speed-up {min(seconds[False]) / min(seconds[True]):.2f}x; prefill tokens x{tokens[True] / max(tokens[False], 1):.2f}; "
          f"top-{e.top_k} rankings identical: {bool(np.array_equal(ranked[True], ranked[False]))} "
          f"(cases that differ: {int((ranked[True] != ranked[False]).any(1).sum())})")


if __name__ == "__main__":
    main()
