"""The one Trainer and logger factory: trainer.* passes through to Lightning, logger=csv|tensorboard,
and the debug group runs the pipeline in its own folder."""

from __future__ import annotations

import json

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pipeline.paths import run_dir, tokenizer_fingerprint
from pipeline.trainers import make_logger, make_trainer
from tests.conftest import compose_run


def test_any_lightning_argument_passes_through(tmp_path) -> None:
    cfg = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", "+trainer.limit_val_batches=3",
                       "+trainer.max_time=00:00:10:00", "+trainer.profiler=simple"])
    trainer = make_trainer(cfg, "align", logger=False, max_epochs=2)
    assert trainer.limit_val_batches == 3 and trainer.max_epochs == 2
    assert type(trainer.profiler).__name__ == "SimpleProfiler"
    # The GRU and the RQ-VAE get the run's extra arguments too, but their own layout and schedule.
    gru = make_trainer(cfg, "gru", logger=False, layout=False, max_epochs=5)
    assert gru.max_epochs == 5 and gru.limit_val_batches == 3


def test_extra_trainer_arguments_change_the_fingerprints(tmp_path) -> None:
    """A debug run (fast_dev_run, limit_*) never leaves a folder that the full run would reuse."""
    base = ["experiment=smoke", f"paths.artifacts={tmp_path}"]
    assert tokenizer_fingerprint(compose_run(base)) != tokenizer_fingerprint(compose_run([*base, "debug=limit"]))
    assert tokenizer_fingerprint(compose_run(base)) == tokenizer_fingerprint(compose_run([*base, "+trainer.profiler=simple"]))


def test_the_logger_group_chooses_the_logger(tmp_path) -> None:
    base = ["experiment=smoke", f"paths.artifacts={tmp_path}"]
    assert isinstance(make_logger(compose_run(base), "align"), TensorBoardLogger)
    csv = make_logger(compose_run([*base, "logger=csv"]), "align")
    assert isinstance(csv, CSVLogger) and str(run_dir(compose_run(base))) in csv.save_dir


def test_debug_fast_runs_the_pipeline_in_its_own_folder(tmp_path, model_cache) -> None:
    """`debug=fast` (Lightning's fast_dev_run): one batch through the RQ-VAE and the alignment, in
    <run_name>/debug-fast, never in the experiment's own folder."""
    from run import run

    cfg = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", f"paths.cache={model_cache}", "debug=fast",
                       "stage=align", "progress.style=none", "tokenizer.progress_bar=false"])
    result = run(cfg)["align"]
    assert result["steps"] == 1
    assert run_dir(cfg).name == "debug-fast" and (run_dir(cfg) / "align.json").is_file()
    metrics = json.loads(next(tmp_path.glob("synthetic/tokenizer-*/metrics.json")).read_text())
    assert metrics["training"]["epochs"] <= 1
