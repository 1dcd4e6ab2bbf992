"""Description-embedding throughput of the LLM encoder: texts/s per truncation and batch size, and
optionally eager against ``torch.compile``, measured side by side in one process.

The texts are NYC release descriptions when ``--data`` points at the release (else synthetic ones of
the same shape), sorted by length as ``embed_texts`` sorts them. Every setting embeds the same texts;
the order of the settings is reversed on the second pass, so machine drift hits them alike.

    .venv/bin/python benchmarks/bench_embed.py [--texts 256] [--max-length 128 1024] [--batch-sizes 8 32]
        [--compile] [--data ../shared/data/foursquare_nyc/qtmob_foursquare_NYC]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.embed import _Encoder  # noqa: E402
from tests.conftest import compose_run  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "foursquare_nyc" / "qtmob_foursquare_NYC"


def load_texts(data: Path, n: int) -> tuple[list[str], str]:
    prompts = sorted((data / "prompts").glob("*.txt"), key=lambda p: int(p.stem)) if (data / "prompts").is_dir() else []
    if prompts:
        return [p.read_text() for p in prompts[:n]], f"{min(n, len(prompts))} NYC release descriptions"
    line = "The 10 nearest POIs and their distances are: " + "; ".join(f"Place {i}, distance 0.{i:02d} km" for i in range(10)) + "."
    texts = [f'The name of this location is "Spot {i}" and its POI category is Bar.\n' + "\n".join([line] * 4) for i in range(n)]
    return texts, f"{n} synthetic descriptions (no release at {data})"


def time_setting(encoder: _Encoder, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        encoder(texts[i : i + batch])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--max-length", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd encoder (compile time reported apart)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "qtmob")
    args = ap.parse_args()
    llm = compose_run(["llm=smollm2_135m"]).llm  # the typed settings the library takes
    texts, what = load_texts(args.data, args.texts)
    texts.sort(key=len)
    dtype = getattr(torch, args.dtype)
    print(f"{what}, SmolLM2-135M in {args.dtype}, {torch.get_num_threads()} threads")
    print("| max_length | batch | encoder | texts/s | tokens/s |\n|---|---|---|---|---|")
    for max_length in args.max_length:
        eager = _Encoder("llm", llm, args.cache, max_length, seed=0, dtype=dtype)
        encoders = {"eager": eager}
        if args.compile:
            compiled = _Encoder("llm", llm, args.cache, max_length, seed=0, dtype=dtype)
            compiled.model = torch.compile(compiled.model, dynamic=True)
            start = time.perf_counter()
            compiled(texts[:8])
            print(f"(compiling for max_length {max_length}: {time.perf_counter() - start:.0f} s)")
            encoders["compiled"] = compiled
        tokens = sum(min(len(ids), max_length) for ids in eager.tokenizer(texts)["input_ids"])
        settings = [(name, b) for b in args.batch_sizes for name in encoders]
        for name, b in settings:  # warm-up: first calls allocate
            encoders[name](texts[:b])
        seconds = dict.fromkeys(settings, 0.0)
        for order in (settings, settings[::-1]):
            for name, b in order:
                seconds[(name, b)] += time_setting(encoders[name], texts, b)
        for name, b in settings:
            s = seconds[(name, b)] / 2
            print(f"| {max_length} | {b} | {name} | {len(texts) / s:.1f} | {tokens / s:.0f} |")


if __name__ == "__main__":
    main()
