"""Benchmark: building every NYC training and test sample from the QT-Mob release.

Compares, side by side in one run (ratios, since timings on shared machines are noisy):

* **polars** — this suite: ``read_qtmob_release`` + ``build_sample_index`` + ``render_samples``;
* **row-by-row** — a plain-Python re-implementation of the way QT-Mob's official data code
  builds samples (``ast.literal_eval`` per trajectory cell, a Python loop per sample, string
  formatting per visit). It is our own code written for comparison, not the official code (which
  uses pandas for reading); it produces the same samples and the same text.

Each variant runs in its own child process so that peak RSS is measured per variant.

Usage: ``python benchmarks/bench_samples.py [--root ../shared/data/foursquare_nyc/qtmob_foursquare_NYC] [--repeat 3]``
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
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "foursquare_nyc" / "qtmob_foursquare_NYC"


def _polars(root: Path) -> dict:
    import polars as pl

    from datamodules.config import SampleConfig
    from datamodules.errors import Quarantine
    from datamodules.readers.qtmob_release import read_qtmob_release, read_release_profiles
    from datamodules.rendering import render_samples
    from datamodules.samples import build_sample_index

    released = json.loads((root / "index_Llama-3.2-1B-Instruct.json").read_text())
    codes = pl.DataFrame({"loc_id": [int(k) for k in released], "code": ["".join(v) for v in released.values()]})
    t_read0 = time.perf_counter()
    checkins, descriptions = read_qtmob_release(root, Quarantine())
    profiles = read_release_profiles(root)
    t0 = time.perf_counter()
    checkins = checkins.with_columns(loc_id=pl.col("poi_id").cast(pl.Int64))
    descriptions = descriptions.with_columns(
        short_description=pl.col("description").str.split("\n").list.head(3).list.join("\n")
    )
    index = build_sample_index(checkins, descriptions["loc_id"], SampleConfig())
    out = render_samples(index, checkins, codes, descriptions, profiles)
    t1 = time.perf_counter()
    return {"read_s": t0 - t_read0, "build_s": t1 - t0, "samples": out.height, "chars": int(out["prompt"].str.len_chars().sum())}


def _row_by_row(root: Path) -> dict:
    import ast
    import csv
    import random

    from datamodules.prompts import MASK, RESPONSE_PREFIX, TEMPLATES, UNKNOWN

    released = json.loads((root / "index_Llama-3.2-1B-Instruct.json").read_text())
    code = {int(k): "".join(v) for k, v in released.items()}
    t_read0 = time.perf_counter()
    # The suite's restricted unpickler (numbers, tuples and dicts only): a crafted loc2id cannot run code.
    from datamodules.readers.qtmob_release import read_loc2id

    loc2id = {(lon, lat): i for lon, lat, i in read_loc2id(root / "loc2id").iter_rows()}
    csv.field_size_limit(1 << 30)
    trajs = {}
    for split in ("train", "valid", "test"):
        with open(root / f"trips_{split}.csv", newline="") as fh:
            trajs[split] = [(r["user_id"], ast.literal_eval(r["trips"])) for r in csv.DictReader(fh)]
    with open(root / "user_profile.csv", newline="") as fh:
        profile = {r["user_id"]: r["prompt"] for r in csv.DictReader(fh, delimiter="|")}
    desc = {int(p.stem): p.read_text().strip() for p in (root / "prompts").glob("*.txt")}
    t0 = time.perf_counter()
    rng = random.Random(42)
    samples = []

    def visit(u, item, shown=None):
        lon, lat, t = item.split(",")
        c = code[loc2id[(float(lon), float(lat))]] if shown is None else shown
        return t, c, f"At time {t}, user {u} visited POI index {c}."

    for split, rows in trajs.items():
        for u, items in rows:
            prof = f"User {u} has the following profile: {profile.get(u, '')}\n"
            vs = [visit(u, it) for it in items]
            targets = [len(vs) - 1] if split == "test" else range(2, len(vs))
            for i in targets:
                hist = " ".join(s for _, _, s in vs[max(0, i - 20) : i])
                t = vs[i][0]
                prompt = TEMPLATES["next"][0].format(profile=prof, user=u, history=hist, time=t)
                samples.append((prompt, RESPONSE_PREFIX["next"].format(time=t, user=u), vs[i][1]))
            h = vs[:20]
            L = len(h)
            modes = ["single"] if split == "test" else ["multi", "single"]
            for mode in modes:
                k = rng.randint(max(1, int(0.2 * L)), max(1, int(0.5 * L)))
                masked = rng.sample(range(1, L), k)
                targets = [None] if mode == "multi" else masked
                for p in targets:
                    shown = []
                    for j, (t, c, s) in enumerate(h):
                        if j == p or (mode == "multi" and j in masked):
                            shown.append(visit(u, items[j], MASK)[2])
                        elif j in masked:
                            shown.append(visit(u, items[j], UNKNOWN)[2])
                        else:
                            shown.append(s)
                    task = "recovery_multi" if mode == "multi" else "recovery_single"
                    prompt = TEMPLATES[task][0].format(profile=prof, user=u, visits=" ".join(shown))
                    target = " ".join(s for _, _, s in h) if p is None else h[p][1]
                    samples.append((prompt, "", target))
            if split != "test":
                blocks = []
                for j, item in enumerate(items[:20]):
                    lon, lat, t = item.split(",")
                    short = "\n".join(desc[loc2id[(float(lon), float(lat))]].split("\n")[:3])
                    blocks.append(f"[ {j + 1} ]\nTime: {t}\nLocation Description: {short}")
                prompt = TEMPLATES["translation"][0].format(user=u, blocks="\n".join(blocks))
                samples.append((prompt, "", " ".join(f"[ {j + 1} ] {s}" for j, (_, _, s) in enumerate(h))))
    for loc, text in desc.items():
        samples.append((TEMPLATES["index2loc"][0].format(code=code[loc]), "", text))
        samples.append((TEMPLATES["loc2index"][0].format(description=text), RESPONSE_PREFIX["loc2index"], code[loc]))
    t1 = time.perf_counter()
    return {"read_s": t0 - t_read0, "build_s": t1 - t0, "samples": len(samples), "chars": sum(len(s[0]) for s in samples)}


def _child(variant: str, root: str) -> None:
    sys.path.insert(0, str(REPO))
    fn = {"polars": _polars, "row_by_row": _row_by_row}[variant]
    result = fn(Path(root))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=["polars", "row_by_row"])
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.root)
        return
    if not (Path(args.root) / "trips_train.csv").is_file():
        sys.exit(f"no QT-Mob release at {args.root}; pass --root")
    runs: dict[str, list[dict]] = {"polars": [], "row_by_row": []}
    for _ in range(args.repeat):  # interleaved, so both variants see the same machine load
        for variant in runs:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, "--root", args.root],
                capture_output=True, text=True, check=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {v: min(r, key=lambda x: x["read_s"] + x["build_s"]) for v, r in runs.items()}
    print(f"{'variant':<12} {'samples':>8} {'read s':>8} {'build s':>8} {'total s':>8} {'peak RSS MB':>12}")
    for v, r in best.items():
        print(f"{v:<12} {r['samples']:>8} {r['read_s']:>8.3f} {r['build_s']:>8.3f} {r['read_s'] + r['build_s']:>8.3f} {r['peak_rss_mb']:>12.0f}")
    p, b = best["polars"], best["row_by_row"]
    print(f"speed-up (build): {b['build_s'] / p['build_s']:.1f}x; (read+build): "
          f"{(b['read_s'] + b['build_s']) / (p['read_s'] + p['build_s']):.1f}x; "
          f"peak RSS ratio: {p['peak_rss_mb'] / b['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
