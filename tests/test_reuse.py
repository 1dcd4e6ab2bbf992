"""Nothing half-checked is reused: broken artefacts are rebuilt by the stage that owns them, a run folder
of another configuration is never replaced silently, a bad setting fails before anything is deleted,
and a cut checkpoint restarts training instead of failing on every rerun."""

from __future__ import annotations

import json
import logging

import pytest

from datamodules.config import ConfigError
from datamodules.errors import DataError
from tests.conftest import compose_cfg, compose_run, run_pipeline


def _cfg(art, cache, *overrides: str):
    # tokenizer=id: the tokenizer stage in a blink, so these tests are about reuse, not training.
    return compose_cfg(["experiment=smoke", "tokenizer=id", f"paths.artifacts={art}", f"paths.cache={cache}",
                        *overrides])


def _cut(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_broken_data_and_tokenizer_artefacts_are_rebuilt_by_their_stage(tmp_path, model_cache, caplog) -> None:
    from pipeline.data import run_data_stage
    from pipeline.paths import data_dir, tokenizer_dir
    from pipeline.tokenizer import run_tokenizer_stage

    cfg = _cfg(tmp_path, model_cache)
    first = run_pipeline(cfg, "tokenizer")
    summary = json.loads((data_dir(cfg) / "summary.json").read_text())
    assert set(summary["manifest"]) >= {"checkins.parquet", "sample_index.parquet", "quarantine.csv"}
    assert set(first["manifest"]) == {"codes.parquet", "index.json", "code_map.png"}

    # A cut summary.json: one warning line and a rebuild, not a JSONDecodeError.
    (data_dir(cfg) / "summary.json").write_text('{"fingerprint": "')
    with caplog.at_level(logging.WARNING):
        assert run_data_stage(cfg)["checkins"] == summary["checkins"]
    assert "summary.json is unreadable" in caplog.text

    # A cut checkins.parquet is found by its manifest while a *later* stage is asked for; the data stage
    # (its owner, run first by run.py) rebuilds it, and the tokenizer stage is reused.
    _cut(data_dir(cfg) / "checkins.parquet")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_pipeline(cfg, "tokenizer")["manifest"] == first["manifest"]
    assert "checkins.parquet changed since the stage wrote it" in caplog.text
    assert "tokenizer: artefacts" in caplog.text and "skipping" in caplog.text

    # A cut codes.parquet: the tokenizer stage rebuilds it to the same codes.
    _cut(tokenizer_dir(cfg) / "codes.parquet")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = run_tokenizer_stage(cfg)
    assert "codes.parquet changed" in caplog.text and again["manifest"]["codes.parquet"] == first["manifest"]["codes.parquet"]


def test_run_folders_keep_their_work(tmp_path, model_cache, caplog) -> None:
    from hydra.errors import ConfigCompositionException

    from pipeline.align import run_align_stage

    cfg = _cfg(tmp_path, model_cache, "align.train_samples=16", "align.checkpoint_every_n_steps=1", "align.num_generations=0",
               "eval.val_cases=0")
    done = run_pipeline(cfg, "align")
    run = tmp_path / "synthetic" / "smoke"
    adapter, last = run / "model" / "adapter_model.safetensors", run / "checkpoints" / "last.ckpt"
    assert done["steps"] == 2 and adapter.is_file() and last.is_file() and "model/adapter_model.safetensors" in done["manifest"]
    config_before = (run / "config.yaml").read_text()

    # A setting that is not a number or not allowed: it fails while the config is made, before anything is touched.
    with pytest.raises(ConfigCompositionException, match=r"align.lr=abc"):
        _cfg(tmp_path, model_cache, "align.train_samples=16", "align.lr=abc")
    with pytest.raises(ConfigError, match=r"align.quantization='nf5' is not one of"):
        run_pipeline(_cfg(tmp_path, model_cache, "align.train_samples=16", "align.quantization=nf5"), "align")
    # A valid but different setting in the same run folder: the finished model is kept, the run stops.
    with pytest.raises(DataError, match=r"another configuration.*run_name=.*force=true"):
        run_align_stage(_cfg(tmp_path, model_cache, "align.train_samples=16", "align.lr=0.01"))
    assert adapter.is_file() and last.is_file() and (run / "config.yaml").read_text() == config_before

    # A deleted adapter file is found by the manifest; a cut last.ckpt is set aside and training restarts.
    adapter.unlink()
    _cut(last)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = run_align_stage(cfg)
    assert "adapter_model.safetensors is missing" in caplog.text and "does not load" in caplog.text
    assert again["steps"] == 2 and again["resumed_from"] is None and adapter.is_file()
    assert len(list(run.glob("unreadable-last-*.ckpt"))) == 1, "the unreadable checkpoint is set aside, not deleted"


def test_a_changed_input_file_rebuilds_the_data_stage(tmp_path, caplog) -> None:
    """Regression: the data fingerprint hashed the config only, so a fixed row or a cut file was ignored."""
    from pipeline.paths import data_dir, data_fingerprint
    from pipeline.data import run_data_stage
    from datamodules.readers.synthetic import generate_city
    from tests.test_raw_readers import write_city_as_tsmc

    raw = tmp_path / "raw"
    raw.mkdir()
    city = generate_city(seed=1, n_users=40, n_pois=200, days=60)
    path = write_city_as_tsmc(city, raw / "dataset_TSMC2014_NYC.txt", bad_rows=2)
    cfg = compose_cfg(["data=tsmc_nyc", f"data.root={raw}", f"paths.artifacts={tmp_path / 'art'}"])
    first = run_data_stage(cfg)
    assert first["quarantined_rows"] == 2 and first["inputs"][str(path)]["size"] == path.stat().st_size
    before = data_fingerprint(cfg)
    # Touching the file without changing it keeps everything.
    path.touch()
    assert data_fingerprint(cfg) == before
    # Fixing the bad rows is a new input: a new data folder, rebuilt, without the quarantined rows.
    write_city_as_tsmc(city, path, bad_rows=0)
    assert data_fingerprint(cfg) != before
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fixed = run_data_stage(cfg)
    assert "skipping" not in caplog.text and fixed["quarantined_rows"] == 0
    assert fixed["protocol"]["input_checkins"] == first["protocol"]["input_checkins"] + 2
    assert data_dir(cfg).name != f"data-{before[:8]}"


@pytest.mark.parametrize("override", ["data.samples.visit_text=compact", "data.samples.user_places=5",
                                      "data.samples.add_profile=false", "data.samples.drop_description_lines=[]"])
def test_how_samples_are_written_retrains_only_the_alignment(tmp_path, override) -> None:
    """The rendering settings (pipeline.paths.RENDER_KEYS) leave the data and tokenizer folders alone (a
    cpu_recipe grid trains one RQ-VAE) and give the alignment a folder of its own; which samples exist
    (data.samples.max_history) is the data stage's."""
    from pipeline.paths import align_fingerprint, data_dir, tokenizer_dir

    base = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}"])
    other = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", override])
    assert data_dir(other) == data_dir(base) and tokenizer_dir(other) == tokenizer_dir(base)
    assert align_fingerprint(other) != align_fingerprint(base)
    index = compose_run(["experiment=smoke", f"paths.artifacts={tmp_path}", "data.samples.max_history=7"])
    assert data_dir(index) != data_dir(base) and align_fingerprint(index) != align_fingerprint(base)


def test_city_knobs_at_their_neutral_value_keep_every_data_fingerprint() -> None:
    """The synthetic city's session-40 knobs (day_shift_h, stop_jitter_h, popularity) are part of every data
    config; at the value that generates the city as before they stay out of the fingerprint, so no dataset's
    data, tokenizer or alignment folders are rebuilt for them (the smoke city's fingerprint of before them),
    while a knob that changes the city makes a new data folder."""
    from pipeline.paths import data_fingerprint

    smoke = compose_cfg(["experiment=smoke"])
    assert data_fingerprint(smoke) == "acbbab15bd492c93", "the smoke city's data fingerprint before the city knobs"
    typed = compose_run(["experiment=smoke"])
    typed.data.city.day_shift_h = (0.0, 0.0)  # a tuple, as the dataclass types it, is the same neutral value
    assert data_fingerprint(typed) == "acbbab15bd492c93"
    for knob in ("data.city.day_shift_h=[1.0,2.0]", "data.city.stop_jitter_h=[0.5,1.0]", "data.city.popularity=1.0"):
        assert data_fingerprint(compose_cfg(["experiment=smoke", knob])) != "acbbab15bd492c93", knob
