"""stage=report gathers a sweep folder, whatever happened to each grid point."""

from __future__ import annotations

import json

from pipeline.report import JOB_RECORD, gather


def test_a_point_whose_config_failed_is_reported_not_a_crash(tmp_path) -> None:
    """A grid point stopped by a config error has no run folder (its config never became a RunConfig):
    the report lists it as failed with its message."""
    sweep = tmp_path / "multirun" / "t"
    for num, record in enumerate([
        {"status": "failed", "error": "ConfigError: align.quantization='nf5' is not one of [...]", "stage": "all",
         "stages": [], "run_dir": None, "variant": None, "overrides": ["align.quantization=nf5"]},
        {"status": "failed", "error": "DataError: tokenizer=released needs an index", "stage": "all", "stages": [],
         "run_dir": str(tmp_path / "runs" / "p1"), "variant": "tokenization-released", "overrides": ["tokenizer=released"]},
    ]):
        (sweep / str(num)).mkdir(parents=True)
        (sweep / str(num) / JOB_RECORD).write_text(json.dumps(record))
    points = gather(sweep)
    assert [p["status"] for p in points] == ["failed", "failed"]
    assert "nf5" in points[0]["error"] and points[1]["point"] == "tokenization-released"


def test_grid_points_are_compared_pairwise_on_their_rankings(tmp_path) -> None:
    """Three points: the second is right on 40 % more of the same 300 cases than the first (a paired interval
    above 0), the third ranked other cases (not paired, said so)."""
    import numpy as np
    import polars as pl

    from pipeline.report import markdown, paired_rows
    from pipeline.test import rankings_frame

    n, name = 300, "QT-Mob (tiny)"
    target = np.arange(n)
    cases = pl.DataFrame({"sample_id": np.arange(n), "task": ["next"] * n, "traj_id": [f"t{i}" for i in range(n)],
                          "target_pos": [3] * n, "target_loc": target})
    wrong = np.full((n, 10), 10_000)
    better = wrong.copy()
    better[: int(0.4 * n), 0] = target[: int(0.4 * n)]
    sweep = tmp_path / "multirun" / "t"
    for num, (ranked, frame) in enumerate([(wrong, cases), (better, cases), (wrong, cases.with_columns(target_pos=pl.lit(4)))]):
        run = tmp_path / "runs" / f"p{num}"
        run.mkdir(parents=True)
        rankings_frame(frame, {name: ranked, "user_time": wrong}).write_parquet(run / "rankings.parquet")
        record = {"status": "ok", "error": None, "stage": "all", "stages": [], "run_dir": str(run), "variant": f"p{num}", "overrides": []}
        (sweep / str(num)).mkdir(parents=True)
        (sweep / str(num) / JOB_RECORD).write_text(json.dumps(record))
        (run / "results.json").write_text(json.dumps({"reference": name, "metrics": {}}))
    points = gather(sweep)
    rows = paired_rows(points, resamples=500, seed=0)
    assert [r["point"] for r in rows] == ["p1", "p2"] and all(r["reference"] == "p0" for r in rows)
    assert rows[0]["cases"] == n and rows[0]["delta acc@1"] == 0.4 and rows[0]["ci acc@1"][0] > 0.3
    assert rows[1]["error"].startswith("other test cases")
    md = markdown([], sweep, rows)
    assert "| p1 | next | 300 | +0.4000 (" in md and "✓" in md and "not paired" in md
