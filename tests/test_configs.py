"""Every experiment file composes, and the overrides later stages rely on work."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR, REPO, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_experiment_files_exist() -> None:
    assert {"nyc_qlora", "nyc_qlora_cpu", "tky_qlora", "ca_qlora", "smoke"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, tmp_path) -> None:
    cfg = compose_cfg([f"experiment={experiment}", "data.root=/some/where", f"paths.artifacts={tmp_path}"])
    # Resolving everything proves no interpolation is broken and nothing required is left unset.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for group in ("data", "llm", "tokenizer", "objectives", "align", "eval", "trainer", "logger", "paths"):
        assert group in container, group
    assert container["run_name"] == experiment
    assert container["data"]["root"] == "/some/where"


@pytest.mark.parametrize("group", ["data", "llm", "tokenizer", "objectives", "align", "eval", "trainer", "logger", "ablation", "launcher"])
def test_every_group_option_composes(group: str) -> None:
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
    assert options, group
    for option in options:
        cfg = compose_cfg([f"{group}={option}"])
        if group not in ("ablation", "launcher"):  # those are @package _global_ (sweep settings)
            assert cfg[group] is not None


def test_stage_seed_and_paths_overrides(tmp_path) -> None:
    cfg = compose_cfg(["stage=data", "seed=7", f"paths.artifacts={tmp_path}", "data=qtmob_nyc", "data.root=/x"])
    assert cfg.stage == "data" and cfg.seed == 7
    assert cfg.data.samples.seed == 7  # the sample seed follows the run seed
    assert cfg.paths.artifacts == str(tmp_path)
    from pipeline.paths import tb_dir

    assert str(tb_dir(cfg)).startswith(str(tmp_path))


def test_raw_experiments_require_data_root() -> None:
    cfg = compose_cfg(["experiment=tky_qlora"])
    assert OmegaConf.is_missing(cfg.data, "root")


def test_cli_cfg_job_composes() -> None:
    """`python run.py experiment=nyc_qlora --cfg job` prints the composed config."""
    out = subprocess.run(
        [sys.executable, "run.py", "experiment=nyc_qlora", "--cfg", "job"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.data.format == "qtmob_release"
    assert cfg.llm.hf_id == "meta-llama/Llama-3.2-1B-Instruct"


ABLATIONS = sorted(p.stem for p in (CONFIG_DIR / "ablation").glob("*.yaml"))


def test_ablation_grids_exist() -> None:
    assert {"objectives", "tokenization", "codebook", "backbone"} <= set(ABLATIONS)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_every_point_of_every_ablation_grid_composes(ablation: str, tmp_path) -> None:
    """Each grid of `python run.py -m experiment=... ablation=<grid>` lists its points under
    hydra.sweeper.params; every point composes with each experiment and gets its own run folder."""
    from pipeline.paths import run_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        full = compose(config_name="run", overrides=[f"ablation={ablation}"], return_hydra_config=True)
    params = dict(full.hydra.sweeper.params)
    assert len(params) == 1
    (group, values), = params.items()
    points = [v.strip() for v in str(values).split(",")]
    assert len(points) >= 3
    for experiment in EXPERIMENTS:
        folders = set()
        for point in points:
            cfg = compose_cfg([f"experiment={experiment}", f"ablation={ablation}", f"{group}={point}",
                               "data.root=/some/where", f"paths.artifacts={tmp_path}"])
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            folders.add(run_dir(cfg))
        assert len(folders) == len(points), (experiment, ablation, folders)


def test_slurm_launcher_composes() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="run", overrides=["experiment=smoke", "launcher=slurm", "launcher_slurm.gpus_per_node=4",
                                                    "launcher_slurm.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 4 and launcher.partition == "gpu"
    assert str(launcher.submitit_folder).endswith(".submit/%j")
