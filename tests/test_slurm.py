"""Ablation grids on a real SLURM: ``python run.py -m ... launcher=slurm`` submits a job array.

The cluster is the single-node Slurm of ``../shared/tools/slurm-local.sh`` (root; a few seconds).
The module starts it when it is not already up (``.ci/run`` starts it too) and stops what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

pytestmark = pytest.mark.slow

SLURM_LOCAL = SHARED / "tools" / "slurm-local.sh"


def _cluster_idle() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm():
    started = False
    if not _cluster_idle():
        if not SLURM_LOCAL.is_file():
            pytest.skip(f"no SLURM cluster and no {SLURM_LOCAL} to start one")
        if os.geteuid() != 0:
            pytest.skip("slurm-local.sh needs root")
        subprocess.run(["bash", str(SLURM_LOCAL), "up"], check=True, timeout=900, capture_output=True)
        started = True
    assert _cluster_idle()
    yield
    if started:
        subprocess.run(["bash", str(SLURM_LOCAL), "down"], timeout=120, capture_output=True)


def sweep(artifacts: Path, *overrides: str, timeout: int = 1200) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a SLURM multirun of experiment=smoke; return the process and its multirun folder."""
    cmd = [sys.executable, "run.py", "-m", "experiment=smoke", "launcher=slurm", f"paths.artifacts={artifacts}",
           "launcher_slurm.cpus_per_task=1", "launcher_slurm.mem_gb=6", "launcher_slurm.timeout_min=30", *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    (folder,) = (artifacts / "multirun").iterdir()
    return done, folder


def report(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "run.py", "stage=report", f"report.sweep={folder}", f"paths.artifacts={folder.parent.parent}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "# Sweep report" in done.stdout
    return json.loads((folder / "report.json").read_text())


def test_a_two_point_grid_runs_as_a_job_array_and_reports(slurm, tmp_path) -> None:
    done, folder = sweep(tmp_path, "objectives=all,next_only")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    # Both points ran as SLURM array tasks (submitit's folder holds their logs) and finished.
    assert list((folder / ".submit").rglob("*_log.out"))
    for num, variant in ((0, "objectives=all"), (1, "objectives=next_only")):
        record = json.loads((folder / str(num) / "qtmob_job.json").read_text())
        assert record["status"] == "ok" and record["variant"] == variant
        results = Path(record["run_dir"]) / "results.json"
        assert results.is_file() and Path(record["run_dir"]).name == variant
    summary = report(folder)
    assert summary["points"] == 2 and summary["ok"] == 2
    points = {r["point"] for r in summary["rows"]}
    assert {"objectives=all", "objectives=next_only", "baseline"} <= points
    # The second point's LLM against the first's on the same test cases, with paired intervals.
    paired = summary["paired"]
    assert paired and {r["point"] for r in paired} == {"objectives=next_only"} and not any(r["error"] for r in paired)
    assert all(r["reference"] == "objectives=all" and r["ci acc@1"][0] <= r["delta acc@1"] <= r["ci acc@1"][1] for r in paired)
    for name in ("report.md", "report.csv", "report.png"):
        assert (folder / name).is_file()
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_a_job_that_dies_is_reported_not_waited_on(slurm, tmp_path) -> None:
    """Cancel one array task while it runs: the sweep ends (with an error naming it) instead of
    waiting, the other point keeps its result, and the report lists the dead one."""
    cmd = [sys.executable, "run.py", "-m", "experiment=smoke", "launcher=slurm", f"paths.artifacts={tmp_path}", "stage=align",
           "launcher_slurm.cpus_per_task=1", "launcher_slurm.mem_gb=6", "seed=1,2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.monotonic() + 600
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %t"], capture_output=True, text=True).stdout.split("\n")
        running = [line.split()[0] for line in out if line.strip().endswith(" R") and line.split()[0].endswith("_1")]
        if running:
            victim = running[0]
            subprocess.run(["scancel", victim], check=True)
        time.sleep(0.5)
    assert victim, "array task 1 never ran"
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode != 0, output[-3000:]
    assert victim.split("_")[0] in output or "CANCELLED" in output or "UncompletedJobError" in output, output[-3000:]
    (folder,) = (tmp_path / "multirun").iterdir()
    summary = report(folder)
    status = {r["point"]: r["status"] for r in summary["rows"] if not r["point"].startswith("baseline")}
    assert status.get("seed=1") == "ok" or status.get("seed=1") == "no results", status
    assert status["seed=2"] in ("died", "failed"), status
    assert "seed=2" in summary["failed"]
