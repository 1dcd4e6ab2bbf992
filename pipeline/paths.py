"""Stage folders and fingerprints: where each stage writes and what decides whether it may be reused.

A stage folder carries the fingerprint of everything that determines its content (the settings,
resolved for this machine where ``auto`` means another thing elsewhere, and the fingerprints of the
stages it reads); :func:`datamodules.artifacts.reusable` compares them, the one reuse rule of every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datamodules.artifacts import fingerprint, sha256_file
from datamodules.dataset import input_files
from datamodules.errors import DataError
from lightning_modules.hardware import resolve_dtype, resolve_precision
from lightning_modules.llm import align_compute_dtype, align_quantization
from location_tokenizers.codes import CodeTable
from pipeline.config import RunConfig, as_dict, load_config

# The process layout (pipeline/trainers.py applies it) and the alignment's schedule (the RQ-VAE has its
# own: tokenizer.max_epochs, ...). Every other trainer.* key is an extra Lightning argument for every
# Trainer of the run, and is in the fingerprints unless it only changes what is reported, so that a
# debug run (trainer.fast_dev_run, limit_*) never leaves a folder that a full run would reuse.
LAYOUT_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision")
SCHEDULE_KEYS = ("max_epochs", "max_steps", "max_time", "min_epochs", "min_steps", "accumulate_grad_batches",
                 "gradient_clip_val", "val_check_interval", "log_every_n_steps")
REPORTING_KEYS = ("profiler", "enable_progress_bar", "enable_model_summary", "default_root_dir", "barebones")
# Arguments of validation loops only: the RQ-VAE has none, so they never retrain the tokenizer.
VALIDATION_KEYS = ("limit_val_batches", "num_sanity_val_steps", "check_val_every_n_epoch", "limit_test_batches",
                   "limit_predict_batches")

# data.samples settings that only change how a sample is written, not which samples exist: they leave
# the data and tokenizer stages alone (a grid over them trains one RQ-VAE) and are in the alignment's.
RENDER_KEYS = ("add_profile", "drop_description_lines", "user_places", "visit_hints", "visit_hint_hours",
               "visit_hint_counts", "visit_hint_count_first", "visit_hint_user_weight", "visit_hint_day_weight",
               "visit_hint_moves_weight", "visit_text")


def extra_trainer_args(cfg: RunConfig) -> dict[str, Any]:
    """``trainer.*`` arguments beyond the layout and the alignment schedule (``+trainer.fast_dev_run=true``,
    ``debug=limit``, ``+trainer.profiler=simple``): they apply to every Trainer of the run."""
    cfg = load_config(cfg)
    return {k: v for k, v in cfg.trainer.items() if k not in LAYOUT_KEYS + SCHEDULE_KEYS}


def _learning_args(cfg: RunConfig) -> dict[str, Any]:
    """The extra arguments that can change what is learnt (in the fingerprints)."""
    return {k: v for k, v in extra_trainer_args(cfg).items() if k not in REPORTING_KEYS}


def run_precision(cfg: RunConfig) -> str:
    """The Lightning precision of the alignment and test (``trainer.precision=auto`` resolved here)."""
    cfg = load_config(cfg)
    return resolve_precision(str(cfg.trainer.get("precision", "auto")), str(cfg.trainer.get("accelerator", "auto")))


# ------------------------------------------------------------------------------------------ data
def data_dir(cfg: RunConfig) -> Path:
    """``<paths.artifacts>/<data.name>/data-<fingerprint>``: one folder per data config, so that
    experiments with other sample settings (and grid points running at once) never overwrite it."""
    cfg = load_config(cfg)
    return Path(cfg.paths.artifacts) / cfg.data.name / f"data-{data_fingerprint(cfg)[:8]}"


# (path, size, mtime_ns) -> sha256: an input is read once per process however often the fingerprint is asked for.
_HASHES: dict[tuple[str, int, int], str] = {}


def input_manifest(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Size, modification time and content hash of every input file (streamed: SNAP Gowalla's ~400 MB
    costs seconds, once per process)."""
    cfg = load_config(cfg)
    out = {}
    for path in input_files(cfg.data):
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(path)
        out[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _HASHES[key]}
    return out


# data.city knobs added after data folders were built (session 40), with the value that generates the city as
# before: at that value a knob stays out of the data fingerprint, so every dataset's folders keep theirs.
NEUTRAL_CITY: dict[str, Any] = {"day_shift_h": [0.0, 0.0], "stop_jitter_h": [0.0, 0.0], "popularity": 0.0,
                                 "checkin_rate": 1.0, "shared_routes": 0.0}


def data_fingerprint(cfg: RunConfig) -> str:
    """The ``data`` settings (without those that do not change the artefacts: the loader, downloading)
    and the *content* of every input file: a fixed row or a cut file means a new data folder."""
    cfg = load_config(cfg)
    data = {k: v for k, v in as_dict(cfg.data).items() if k not in ("loader", "download")}
    data["samples"] = {k: v for k, v in data["samples"].items() if k not in RENDER_KEYS}
    data["city"] = {k: v for k, v in data["city"].items()
                    if not (k in NEUTRAL_CITY and NEUTRAL_CITY[k] == (list(v) if isinstance(v, tuple) else v))}
    inputs = {name: (m["size"], m["sha256"]) for name, m in input_manifest(cfg).items()}
    return fingerprint({**data, "inputs": inputs})


# align.* and data.samples switches added after models were trained, with the value that leaves training as
# it was: at that value a switch stays out of the fingerprint, so the models trained before it keep theirs
# (and their tests).
NEUTRAL_SWITCHES: dict[str, Any] = {"lora_plus_ratio": 1.0, "first_code_weight": 1.0, "visit_hint_counts": False,
                                     "visit_hint_count_first": False, "visit_hint_user_weight": 0.0, "visit_hint_day_weight": 1.0,
                                     "visit_hint_moves_weight": 0.0, "code_softmax": "vocab", "lora_layers": 0,
                                     "hint_smoothing": 0.0, "hint_smoothing_decay": 1.0}


def without_neutral(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` less the switches at their neutral value (:data:`NEUTRAL_SWITCHES`)."""
    return {k: v for k, v in settings.items() if not (k in NEUTRAL_SWITCHES and NEUTRAL_SWITCHES[k] == v)}


def render_settings(cfg: RunConfig) -> dict[str, Any]:
    """The ``data.samples`` settings that only change how samples are written (:data:`RENDER_KEYS`): part
    of the alignment's fingerprint, not of the data or tokenizer stages', whose tables they do not touch."""
    cfg = load_config(cfg)
    settings = without_neutral({k: v for k, v in as_dict(cfg.data.samples).items() if k in RENDER_KEYS})
    if settings.get("user_places"):
        # The memory is per trajectory and leaves the sample's own trajectory out (datamodules/user_memory.py):
        # a model trained on the per-user memory that counted it (a train/test mismatch) is never reused.
        settings["user_memory"] = "leave-one-trajectory-out"
    if settings.get("visit_hints") and cfg.data.samples.next_format == "trajectory":
        # A whole-trajectory sample labels its targets' own code runs, not the hints' (datamodules/rendering.py,
        # fixed in session 37): a model trained on the hint runs is never reused.
        settings["hint_labels"] = "visit-code-runs"
    return settings


def read_data(cfg: RunConfig, name: str):
    """A table of the finished data stage."""
    cfg = load_config(cfg)
    import polars as pl

    path = data_dir(cfg) / name
    if not path.is_file():
        raise DataError(f"{path} not found: run the data stage first (python run.py stage=data ...)")
    return pl.read_parquet(path)


# ------------------------------------------------------------------------------------- tokenizer
def embed_dtype(cfg: RunConfig) -> str:
    """The dtype the description encoder runs in (``tokenizer.embed_dtype=auto`` resolved here)."""
    cfg = load_config(cfg)
    return resolve_dtype(cfg.tokenizer.embed_dtype, str(cfg.trainer.get("accelerator", "auto")))


def rqvae_precision(cfg: RunConfig) -> str:
    """The precision of the RQ-VAE's MLPs (``tokenizer.precision=auto`` resolved here)."""
    cfg = load_config(cfg)
    return resolve_precision(cfg.tokenizer.precision, str(cfg.trainer.get("accelerator", "auto")))


def tokenizer_fingerprint(cfg: RunConfig) -> str:
    """Everything that determines the codes: data, tokenizer settings, embedder model, seed."""
    cfg = load_config(cfg)
    tok = {k: v for k, v in as_dict(cfg.tokenizer).items() if k != "progress_bar"}
    tok["embed_dtype"], tok["precision"] = embed_dtype(cfg), rqvae_precision(cfg)
    llm = as_dict(cfg.llm) if cfg.tokenizer.kind == "rqvae" and cfg.tokenizer.embedder == "llm" else None
    trainer = {k: v for k, v in _learning_args(cfg).items() if k not in VALIDATION_KEYS}
    return fingerprint({"data": data_fingerprint(cfg), "tokenizer": tok, "llm": llm, "seed": cfg.seed, "trainer": trainer})


def tokenizer_dir(cfg: RunConfig) -> Path:
    """``<paths.artifacts>/<data.name>/tokenizer-<tokenizer.name>-<fingerprint>``: one folder per
    tokenizer config, so that a grid over codebook shapes never mixes up codes."""
    cfg = load_config(cfg)
    return Path(cfg.paths.artifacts) / cfg.data.name / f"tokenizer-{cfg.tokenizer.name}-{tokenizer_fingerprint(cfg)[:8]}"


def load_codes(cfg: RunConfig):
    """The code table of a finished tokenizer stage."""
    cfg = load_config(cfg)
    path = tokenizer_dir(cfg) / "codes.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: run the tokenizer stage first (python run.py stage=tokenizer ...)")
    return CodeTable.read_parquet(path)


def released_table(cfg: RunConfig):
    """The release's own index, if the data folder has one."""
    cfg = load_config(cfg)
    if not cfg.data.root:
        return None
    path = Path(cfg.data.root) / cfg.tokenizer.index_file
    return CodeTable.from_index_json(path) if path.is_file() else None


# ----------------------------------------------------------------------------------- align, test
def run_dir(cfg: RunConfig) -> Path:
    """``<paths.artifacts>/<data.name>/<run_name>[/<variant>][/debug-<name>]``: the alignment, test and
    TensorBoard folder of a run. ``variant`` names a grid point of a sweep (an ablation file sets it; a
    plain multirun uses its overrides), so that the points of one grid never share a folder; a debug
    run (``debug=...``) goes one level below, so it never takes the place of the full run's model."""
    cfg = load_config(cfg)
    out = Path(cfg.paths.artifacts) / cfg.data.name / cfg.run_name
    out = out / cfg.variant if cfg.variant else out
    return out / f"debug-{cfg.debug_run}" if cfg.debug_run else out


def tb_dir(cfg: RunConfig) -> Path:
    """The logger's folder: ``logger.save_dir``, by default ``<run folder>/tb``."""
    cfg = load_config(cfg)
    return Path(cfg.logger.save_dir) if cfg.logger.save_dir else run_dir(cfg) / "tb"


def align_fingerprint(cfg: RunConfig) -> str:
    """Everything that determines the aligned model."""
    cfg = load_config(cfg)
    trainer = {k: cfg.trainer[k] for k in SCHEDULE_KEYS if k in cfg.trainer and k not in ("val_check_interval", "log_every_n_steps")}
    trainer["precision"] = run_precision(cfg)  # resolved: `auto` means another thing on another machine
    align = without_neutral({k: v for k, v in as_dict(cfg.align).items() if k not in ("num_workers", "num_generations")})
    if "hint_smoothing" not in align:  # off: its decay changes nothing
        align.pop("hint_smoothing_decay", None)
    return fingerprint({
        "data": data_fingerprint(cfg), "render": render_settings(cfg), "tokenizer": tokenizer_fingerprint(cfg), "llm": as_dict(cfg.llm),
        "align": {**align, "compute_dtype": align_compute_dtype(cfg.align), "quantization": align_quantization(cfg.align)},
        "objectives": as_dict(cfg.objectives), "trainer": {**trainer, **_learning_args(cfg)}, "seed": cfg.seed,
    })


def test_fingerprint(cfg: RunConfig) -> str:
    cfg = load_config(cfg)
    return fingerprint({"align": align_fingerprint(cfg), "eval": as_dict(cfg.eval)})
