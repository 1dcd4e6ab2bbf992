"""The whole pipeline as a user runs it: ``python run.py experiment=smoke`` in a fresh process.

* determinism: the same seed and config give the same codes and the same test metrics, in another
  process (another ``PYTHONHASHSEED``) and another artefacts folder;
* fault tolerance: SIGKILL during alignment, then the same command resumes from ``last.ckpt`` and
  ends with the metrics of the uninterrupted run;
* skipping: a rerun finds every stage's artefacts and recomputes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SMOKE = ["experiment=smoke"]


def _cmd(artifacts: Path, *extra: str) -> list[str]:
    return [sys.executable, "run.py", *SMOKE, f"paths.artifacts={artifacts}", *extra]


def _env(hash_seed: int) -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONUNBUFFERED": "1"}


def run_smoke(artifacts: Path, hash_seed: int = 0, *extra: str) -> str:
    """Run the smoke experiment to the end in a new process; return its output."""
    done = subprocess.run(_cmd(artifacts, *extra), cwd=REPO, env=_env(hash_seed), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def metrics(artifacts: Path) -> dict[str, float]:
    """``{"model/task/metric": value}`` of the run's results.json."""
    nested = json.loads((artifacts / "synthetic" / "smoke" / "results.json").read_text())["metrics"]
    return {f"{model}/{task}/{name}": v for model, tasks in nested.items() for task, values in tasks.items() for name, v in values.items()}


def codes(artifacts: Path) -> pl.DataFrame:
    (folder,) = (artifacts / "synthetic").glob("tokenizer-*")
    return pl.read_parquet(folder / "codes.parquet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted smoke run."""
    art = tmp_path_factory.mktemp("reference")
    # Progress by steps, not seconds: on an idle machine the RQ-VAE trains in 2 s.
    (art / "run.log").write_text(run_smoke(art, 0, "progress.every_seconds=0", "progress.every_steps=5"))
    return art


def test_a_log_file_shows_progress_with_an_eta_before_each_stage_ends(reference) -> None:
    """Output to a pipe (as in a SLURM log): progress lines of the RQ-VAE, the alignment, the GRU and the
    test loop appear while each runs, each with an ETA, before the line that ends the stage."""
    lines = (reference / "run.log").read_text().splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(lines) if pattern in line)

    for progress, end in (("[rqvae] step ", "tokenizer: 89 locations"), ("[align] step ", "align: 16 steps in"),
                          ("[test] ", "test: 99 cases"), ("[gru dim 64] step ", "test: 99 cases")):
        at = first(progress)
        assert "ETA" in lines[at] or progress == "[test] ", lines[at]
        assert at < first(end), f"{progress!r} only after {end!r}"
    assert any("[test] " in ln and "cases/s" in ln and "ETA" in ln for ln in lines)
    # Quiet: none of the stack's known notices, and no carriage-return progress bars in a log file.
    text = "\n".join(lines)
    for noise in ("GPU available", "litlogger", "LeafSpec", "is_gradient_checkpointing", "srun", "\r"):
        assert noise not in text, noise


def test_same_seed_gives_the_same_codes_and_metrics_in_another_process(reference, tmp_path) -> None:
    run_smoke(tmp_path, hash_seed=1)
    assert codes(tmp_path).equals(codes(reference))
    assert metrics(tmp_path) == metrics(reference)


def test_sigkill_during_alignment_then_rerun_resumes_to_the_same_metrics(reference, tmp_path) -> None:
    run = tmp_path / "synthetic" / "smoke"
    last = run / "checkpoints" / "last.ckpt"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(_cmd(tmp_path), cwd=REPO, env=_env(2), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while not last.is_file():  # the first mid-epoch checkpoint (smoke writes one every 4 steps)
            assert proc.poll() is None, "the run ended before its first checkpoint: " + (tmp_path / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    # Killed mid-training: nothing looks finished, and only the checkpoint survives.
    assert not (run / "align.json").exists() and not (run / "model").exists()
    assert not (run / "results.json").exists()

    out = run_smoke(tmp_path, hash_seed=3)
    assert "align: resuming from" in out
    assert "tokenizer: artefacts in" in out and "skipping" in out  # finished stages are not redone
    assert codes(tmp_path).equals(codes(reference))
    assert metrics(tmp_path) == pytest.approx(metrics(reference), abs=1e-6)
    aligned = json.loads((run / "align.json").read_text())
    assert aligned["resumed_from"] and aligned["steps"] == json.loads((reference / "synthetic" / "smoke" / "align.json").read_text())["steps"]


def test_a_rerun_recomputes_nothing(reference) -> None:
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and "tb" not in p.parts}
    t0 = time.perf_counter()
    out = run_smoke(reference, hash_seed=4)
    for stage in ("data", "tokenizer", "align", "test"):
        assert f"{stage}: artefacts in" in out, f"{stage} was not skipped:\n{out[-2000:]}"
    changed = [p for p, t in before.items() if p.exists() and p.stat().st_mtime_ns != t]
    assert not changed, changed
    assert time.perf_counter() - t0 < 120
