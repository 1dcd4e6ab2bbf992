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
