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
    assert run_dir(cfg).parent == run_dir(compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}"]))
    metrics = json.loads(next(tmp_path.glob("synthetic/tokenizer-*/metrics.json")).read_text())
    assert metrics["training"]["epochs"] <= 1


def test_a_csv_logger_records_every_stage(tmp_path, model_cache) -> None:
    """logger=csv: the RQ-VAE and the alignment write metrics.csv and hparams.yaml (no TensorBoard API)."""
    from run import run

    cfg = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", f"paths.cache={model_cache}", "logger=csv",
                       "stage=align", "progress.style=none", "tokenizer.progress_bar=false", "tokenizer.max_epochs=3",
                       "align.train_samples=16", "eval.val_cases=0", "align.num_generations=0"])
    assert run(cfg)["align"]["steps"] == 2
    for stage in ("tokenizer", "align"):
        folder = next((run_dir(cfg) / "tb" / stage).glob("version_*"))
        assert (folder / "metrics.csv").is_file() and (folder / "hparams.yaml").is_file(), sorted(folder.iterdir())


def test_debug_overfit_fits_the_validation_cadence_to_its_batches(tmp_path, model_cache) -> None:
    """debug=overfit (2 batches) under experiment=smoke (a validation every 8 steps): the cadence is
    clamped to the batches there are, instead of Lightning refusing to start."""
    from run import run

    cfg = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", f"paths.cache={model_cache}", "debug=overfit",
                       "stage=align", "progress.style=none", "tokenizer.progress_bar=false", "tokenizer.max_epochs=3",
                       "eval.val_cases=0", "align.num_generations=0"])
    assert run(cfg)["align"]["steps"] == 2 and run_dir(cfg).name == "debug-overfit"


def test_a_debug_run_in_a_sweep_keeps_the_grid_points_apart(tmp_path) -> None:
    base = ["experiment=smoke", f"paths.artifacts={tmp_path}", "ablation=objectives", "debug=limit"]
    folders = {run_dir(compose_run([*base, f"objectives={o}"])) for o in ("all", "next_only")}
    assert {(f.parent.name, f.name) for f in folders} == {("objectives-all", "debug-limit"), ("objectives-next_only", "debug-limit")}
