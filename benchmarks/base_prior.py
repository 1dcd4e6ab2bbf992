"""Which of its prompt's places does SmolLM2 name *before* any alignment, per visit-hint layout?

The aligned NYC models name the trajectory's last visit first 2-3.5x as often as people return to it, while
under-trusting the visit hint (benchmarks/README.md, "NYC on a CPU"). This measures the pull the alignment
starts from: the base model (no LoRA, no new tokens) reads NYC test trajectories written as the CPU recipe
writes them (compact visits, the user's usual places at each visit's hour with their train counts), with
each place spelt as a distinct single-token word instead of its code, and its next-token logits pick the
place that comes next among the places its prompt names. Where that pick comes from (the target visit's
hint, 1st place or 2nd/3rd; the last visit; another place of the prompt) is counted per layout:

* ``paren``: ``Tue 18:00 (usually <p> ×12 <q> ×3) <x>.`` (the recipe's layout, 3 hints);
* ``paren, 1 hint``: the same with the first place only (``data.samples.visit_hints=1``);
* ``paren, best last``: the 3 hinted places in reverse order, the strongest next to the answer;
* ``echo``: ``... (usually <p> ×12 <q> ×3) usually <x>.``: the token before the answer is the token before
  the hint's first place, so a copy-what-followed-this-token (induction) prior points at the hint.

    .venv/bin/python benchmarks/base_prior.py [--cases 300]

Needs the NYC release (the data stage is built into a temporary folder) and the model cache; ~6 min on
2 cores (one forward pass per case and layout).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEAD = "Predict the next place of this user's trajectory. Visits:\n"
LAYOUTS = {  # name: (sentence of a visit, hint places, their order)
    "paren": ("{t} (usually {h}) {x}.", 3, 1),
    "paren, 1 hint": ("{t} (usually {h}) {x}.", 1, 1),
    "paren, best last": ("{t} (usually {h}) {x}.", 3, -1),
    "echo": ("{t} (usually {h}) usually {x}.", 3, 1),
}


def main() -> None:
    import polars as pl
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datamodules.visit_hints import KEY, hint_scores, top_places
    from lightning_modules.llm import model_path
    from pipeline.data import run_data_stage
    from pipeline.paths import data_dir
    from tests.conftest import NYC_RELEASE, compose_run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300, help="seeded test trajectories (each: its last visit is the target)")
    args = ap.parse_args()
    if not Path(NYC_RELEASE).is_dir():
        sys.exit(f"base_prior: the NYC release is not at {NYC_RELEASE}")
    cfg = compose_run(["experiment=nyc_qlora_cpu", f"data.root={NYC_RELEASE}", f"paths.artifacts={tempfile.mkdtemp()}"])
    run_data_stage(cfg)
    path = model_path(cfg.llm, cfg.paths.cache)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    visits = pl.read_parquet(data_dir(cfg) / "checkins.parquet").sort(KEY)
    top = top_places(hint_scores(visits, 1), 3).group_by(KEY, maintain_order=True).agg("loc_id", "score")
    visits = visits.join(top, on=KEY, how="left", suffix="_hint")
    # Each place as a distinct single-token lower-case word (seeded), so one logit scores it.
    words = sorted(t for t in tok.get_vocab() if re.fullmatch(r"Ġ[a-z]{5,9}", t))  # get_vocab's order varies
    random.Random(0).shuffle(words)
    places = visits["loc_id"].unique().sort().to_list()
    if len(words) < len(places):
        sys.exit(f"base_prior: {len(places)} places but only {len(words)} single-token words")
    token_id = {p: tok.convert_tokens_to_ids(words[i]) for i, p in enumerate(places)}
    name = {p: tok.convert_tokens_to_string([words[i]]).strip() for i, p in enumerate(places)}

    trajectories = [t for t in visits.filter(pl.col("split") == "test").partition_by("traj_id") if t.height >= 3]
    random.Random(1).shuffle(trajectories)
    cases = [t.tail(10).to_dicts() for t in trajectories[: args.cases]]  # the last 10 visits; the last is the target

    print(f"base SmolLM2 ({path}), {len(cases)} NYC test trajectories, the next-token pick among the prompt's places")
    print("| layout | target's hint, 1st | its 2nd/3rd | last visit | another place | right |\n|---|---|---|---|---|---|")
    for layout, (sentence, k, order) in LAYOUTS.items():
        counts = dict.fromkeys(("hint1", "hint23", "last", "other"), 0)
        right = 0
        for case in cases:
            hints = [list(zip(v["loc_id_hint"] or [], v["score"] or []))[:k] for v in case]
            lines = []
            for v, hint in zip(case, hints):
                h = " ".join(f"{name[p]} ×{round(s)}" for p, s in hint[::order])
                text = sentence.format(t=v["local_time"].strftime("%a %H:%M"), h=h, x=name[v["loc_id"]])
                lines.append(text if h else text.replace(" (usually )", ""))
            prompt = HEAD + " ".join(lines)
            prompt = prompt[: prompt.rindex(name[case[-1]["loc_id"]])].rstrip()  # up to the answer
            with torch.no_grad():
                logits = model(tok(prompt, return_tensors="pt").input_ids).logits[0, -1]
            target_hint = [p for p, _ in hints[-1]]
            named = list(dict.fromkeys([v["loc_id"] for v in case[:-1]] + [p for hint in hints for p, _ in hint]))
            pick = max(named, key=lambda p: logits[token_id[p]].item())
            source = ("hint1" if target_hint and pick == target_hint[0] else "hint23" if pick in target_hint
                      else "last" if pick == case[-2]["loc_id"] else "other")
            counts[source] += 1
            right += pick == case[-1]["loc_id"]
        n = len(cases)
        print(f"| {layout} | " + " | ".join(f"{counts[s] / n:.3f}" for s in counts) + f" | {right / n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
