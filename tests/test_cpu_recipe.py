"""ablation=cpu_recipe: every CPU switch of issue 16 runs as one point of a local multirun of the smoke
experiment, each in its own folder, and each switch changes what it says it changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POINTS = ["none", "float32", "bf16", "compact", "trajectory", "user_places", "visit_hints", "visit_hint_counts", "visit_hint_count_first", "visit_hint_weights", "visit_hint_moves", "first_code_weight", "hint_smoothing", "level_softmax", "nf4", "lora", "all"]


@pytest.mark.slow
def test_the_cpu_recipe_grid_runs_on_the_smoke_experiment(tmp_path) -> None:
    cmd = [sys.executable, "run.py", "-m", "experiment=smoke", "ablation=cpu_recipe", "stage=align",
           f"paths.artifacts={tmp_path}", "align.train_samples=16", "trainer.val_check_interval=2",
           "eval.val_cases=0", "align.num_generations=0", "tokenizer.max_epochs=10", "progress.style=none"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    runs = {p.parent.name.removeprefix("cpu-"): json.loads(p.read_text())
            for p in (tmp_path / "synthetic" / "smoke").glob("cpu-*/align.json")}
    assert sorted(runs) == sorted(POINTS)
    assert all(r["steps"] == 2 for r in runs.values())
    meta = {k: json.loads((Path(r["model_dir"]) / "qtmob.json").read_text()) for k, r in runs.items()}
    assert meta["float32"]["training"]["precision"] == "32-true" and meta["bf16"]["training"]["precision"] == "bf16-mixed"
    assert meta["compact"]["visit_text"] == "compact" and meta["none"]["visit_text"] == "official"
    assert meta["trajectory"]["next_format"] == "trajectory" and meta["all"]["next_format"] == "trajectory"
    # hints in whole-trajectory samples record which runs they labelled (stage=predict reads it); elsewhere null
    assert meta["all"]["training"]["hint_labels"] == "visit-code-runs" and meta["visit_hints"]["training"]["hint_labels"] is None
    assert meta["nf4"]["quantization"] == "nf4" and meta["lora"]["quantization"] == "none"
    # one training sample per trajectory chunk instead of one per prefix
    assert runs["trajectory"]["train_samples"] < 0.7 * runs["none"]["train_samples"]  # next: 1 per chunk, not per prefix
    # the same samples with fewer tokens (descriptions and profiles, unchanged, are most of the smoke tokens)
    assert runs["compact"]["train_samples"] == runs["none"]["train_samples"]
    assert runs["compact"]["train_tokens"] < 0.9 * runs["none"]["train_tokens"]
    # the same samples, each visit with its hint: more tokens
    assert runs["visit_hints"]["train_samples"] == runs["none"]["train_samples"]
    assert runs["visit_hints"]["train_tokens"] > runs["none"]["train_tokens"] and meta["visit_hints"]["visit_hints"] == 3
    # and each hinted place with its count: more tokens still
    assert runs["visit_hint_counts"]["train_samples"] == runs["visit_hints"]["train_samples"]
    assert runs["visit_hint_counts"]["train_tokens"] > runs["visit_hints"]["train_tokens"]
    assert meta["visit_hint_counts"]["visit_hint_counts"] is True and meta["visit_hints"]["visit_hint_counts"] is False
    # the same hints and counts, each count before its place: the same samples, about the same tokens
    assert runs["visit_hint_count_first"]["train_samples"] == runs["visit_hint_counts"]["train_samples"]
    assert abs(runs["visit_hint_count_first"]["train_tokens"] / runs["visit_hint_counts"]["train_tokens"] - 1) < 0.05
    assert meta["visit_hint_count_first"]["visit_hint_count_first"] is True and meta["visit_hint_counts"]["visit_hint_count_first"] is False
    # the same samples with every hint scored by day type and the user's overall visits as well: recorded,
    # and other places and counts in the hints (more places where the hour window left a hint short, fewer
    # digits where a rounded score is smaller), so about as many tokens but not the same text
    assert runs["visit_hint_weights"]["train_samples"] == runs["visit_hint_counts"]["train_samples"]
    assert runs["visit_hint_weights"]["train_tokens"] != runs["visit_hint_counts"]["train_tokens"]
    assert abs(runs["visit_hint_weights"]["train_tokens"] / runs["visit_hint_counts"]["train_tokens"] - 1) < 0.1
    assert meta["visit_hint_weights"]["visit_hint_user_weight"] == 0.1 and meta["visit_hint_weights"]["visit_hint_day_weight"] == 3.0
    assert meta["visit_hint_counts"]["visit_hint_user_weight"] == 0.0
    # the user's moves from the previous place as well: recorded, on next-location samples only (the switch
    # leaves out the recovery tasks, whose masked visits a successor's hint would name)
    assert meta["visit_hint_moves"]["visit_hint_moves_weight"] == 10.0 and meta["visit_hint_weights"]["visit_hint_moves_weight"] == 0.0
    assert runs["visit_hint_moves"]["train_samples"] < runs["visit_hint_weights"]["train_samples"]
    assert meta["visit_hint_moves"]["training"]["tasks"] == ["next"]
    # the first code tokens weigh more in training; the samples are the same
    assert meta["first_code_weight"]["training"]["first_code_weight"] == 4.0 and meta["none"]["training"]["first_code_weight"] == 1.0
    assert runs["first_code_weight"]["train_tokens"] == runs["none"]["train_tokens"]
    # code tokens scored over their level only: recorded for the test's decoding; the samples are the same
    assert meta["level_softmax"]["training"]["code_softmax"] == "level" and meta["none"]["training"]["code_softmax"] == "vocab"
    assert runs["level_softmax"]["train_tokens"] == runs["none"]["train_tokens"]
    # the first code tokens trained towards the visits' hints too: recorded, on whole trajectories with hints
    assert meta["hint_smoothing"]["training"]["hint_smoothing"] == 1.0 and meta["none"]["training"]["hint_smoothing"] == 0.0
    assert meta["hint_smoothing"]["training"]["hint_smoothing_decay"] == 0.5
    assert meta["hint_smoothing"]["next_format"] == "trajectory" and meta["hint_smoothing"]["visit_hints"] == 3
