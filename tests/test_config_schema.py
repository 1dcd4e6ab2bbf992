"""The typed config: one source for every default, and every config error before any stage runs.

Each error test runs ``python run.py`` as a user would, in an empty artefact folder, and checks that
the run stops with a short message naming the key (no traceback) and that no stage folder appeared.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datamodules.config import ConfigError, DataConfig
from lightning_modules.config import AlignConfig, LLMConfig
from pipeline.config import EvalConfig, LoggerConfig, ObjectivesConfig, PathsConfig, RunConfig, TokenizerConfig, load_config
from tests.conftest import CONFIG_DIR, REPO, compose_cfg, compose_run

# Each group's default option (experiments/run.yaml) and the dataclass that holds the group's defaults.
DEFAULT_OPTIONS = [
    ("paths/default.yaml", PathsConfig), ("data/_common.yaml", DataConfig), ("data/_raw_protocol.yaml", DataConfig),
    ("data/synthetic.yaml", DataConfig), ("llm/smollm2_135m.yaml", LLMConfig), ("tokenizer/rqvae.yaml", TokenizerConfig),
    ("objectives/all.yaml", ObjectivesConfig), ("align/qlora.yaml", AlignConfig), ("eval/default.yaml", EvalConfig),
    ("logger/tensorboard.yaml", LoggerConfig),
]


def _leaves(node: typing.Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], node


def _default(cls: type, dotted: str) -> typing.Any:
    obj: typing.Any = cls()
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return list(obj) if isinstance(obj, tuple) else obj


@pytest.mark.parametrize(("path", "cls"), DEFAULT_OPTIONS, ids=[p for p, _ in DEFAULT_OPTIONS])
def test_default_options_only_restate_the_dataclass_defaults(path: str, cls: type) -> None:
    """Where a dataclass gives a default, the group's default YAML option states the same value (or binds
    it to another key, like ``${seed}``); None and ``???`` defaults are for the options to choose."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / path), resolve=False)
    raw.pop("defaults", None)
    disagree = []
    for key, value in _leaves(raw):
        default = _default(cls, key)
        if default is None or default == "???" or (isinstance(value, str) and value.startswith("${")):
            continue
        if value != default:
            disagree.append(f"{key}: yaml {value!r}, code {default!r}")
    assert not disagree, f"{path} disagrees with {cls.__name__}: {disagree}"


def test_the_six_defaults_that_used_to_disagree_now_agree() -> None:
    """Issue 14 found six code defaults unlike the YAML; the typed config has one value for each."""
    cfg = compose_run([])
    assert (cfg.tokenizer.embed_dtype, cfg.tokenizer.precision, cfg.align.compute_dtype) == ("auto", "auto", "auto")
    assert cfg.tokenizer.coherence_every == TokenizerConfig().coherence_every == 25
    assert AlignConfig().gradient_checkpointing is True and EvalConfig().val_cases == 32


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_loads_typed(experiment: str) -> None:
    cfg = compose_run([f"experiment={experiment}", "data.root=/some/where"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.data, DataConfig) and isinstance(cfg.llm, LLMConfig)
    assert dataclasses.is_dataclass(cfg.data.samples) and cfg.data.samples.seed == cfg.seed


def test_the_random_model_takes_its_tokenizer_from_another_option() -> None:
    cfg = compose_run(["llm=tiny_random"])
    assert cfg.llm.source == "random" and cfg.llm.tokenizer_from.name == "smollm2_135m"


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QTMOB_ARTIFACTS": str(tmp_path / "artifacts"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "run.py", "experiment=smoke", "progress.style=none", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _stopped_early(out: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> None:
    """Exit status != 0, no traceback, the key in the first line and what is allowed in the message.

    Errors found while Hydra composes (unknown key, wrong type, unknown option) are Hydra's own short
    message: a first line naming the override, then the allowed options or the expected type. The
    rest (values outside a set, required settings, trainer arguments) are run.py's single line."""
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    message = out.stderr.strip()
    assert all(w in message for w in words), message
    assert words[0] in message.splitlines()[0], message
    assert len(message.splitlines()) <= 16, message
    stage_folders = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_dir() and p.name.split("-")[0] in ("data", "tokenizer")]
    assert not stage_folders, stage_folders


def test_an_unknown_key_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "align.lrr=0.1"), tmp_path, "align.lrr")
    _stopped_early(_run(tmp_path, "+align.lrr=0.1"), tmp_path, "align.lrr")


def test_a_wrong_type_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "align.lr=abc"), tmp_path, "align.lr", "abc")


def test_a_value_outside_its_set_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "align.quantization=nf5"), tmp_path, "align.quantization", "nf5", "nf4")


def test_a_missing_data_root_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "data=tsmc_nyc"), tmp_path, "data.root")


def test_an_unknown_llm_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "llm=gpt5"), tmp_path, "llm/gpt5", "smollm2_135m")


def test_run_py_errors_are_one_line(tmp_path) -> None:
    for override in ("align.quantization=nf5", "data=tsmc_nyc", "+trainer.fast_dev_runn=true"):
        out = _run(tmp_path, override)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_an_unknown_trainer_argument_fails_before_any_stage(tmp_path) -> None:
    _stopped_early(_run(tmp_path, "+trainer.fast_dev_runn=true"), tmp_path, "trainer.fast_dev_runn")


@pytest.mark.parametrize(("override", "words"), [
    ("trainer.val_check_interval=abc", ("trainer", "abc")), ("trainer.max_epochs=many", ("trainer.max_epochs", "many")),
    ("trainer.gradient_clip_val=big", ("trainer", "gradient_clip_val")), ("trainer.precision=33", ("trainer", "33")),
])
def test_a_trainer_value_lightning_refuses_fails_before_any_stage(override: str, words: tuple[str, ...], tmp_path) -> None:
    """The trainer group is Lightning's own arguments (no schema of ours): their values are checked by
    building the Trainer once, before the data stage, not minutes later at the alignment."""
    from pipeline.trainers import check_trainer_args

    with pytest.raises(ConfigError) as err:
        check_trainer_args(compose_run(["experiment=smoke", override]))
    assert all(w in str(err.value) for w in words) and len(str(err.value).splitlines()) == 1, str(err.value)


@pytest.mark.parametrize(("override", "key"), [
    ("data.samples.visit_text=tiny", "data.samples.visit_text"), ("eval.decoding=greedy", "eval.decoding"),
    ("tokenizer.embedder=bert", "tokenizer.embedder"), ("logger.kind=wandb", "logger.kind"),
    ("align.batch_size=0", "align.batch_size"), ("objectives.tasks=[next,chat]", "objectives.tasks"),
    ("data.city.day_shift_h=[2.0]", "data.city.day_shift_h"), ("data.city.stop_jitter_h=[3.0,1.0]", "data.city.stop_jitter_h"),
    ("data.city.explore=[0.5,1.5]", "data.city.explore"), ("data.city.popularity=nan", "data.city.popularity"),
    ("data.city.n_users=0", "data.city.n_users"),
])
def test_load_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(compose_cfg(["experiment=smoke", override]))
