"""The typed run configuration: one dataclass per config group, registered as Hydra's schema.

``experiments/run.yaml`` lists ``qtmob_schema`` first in its defaults, so every composed config is
merged onto :class:`RunConfig`: an unknown key (``align.lrr=1``) or a wrong type (``align.lr=abc``)
fails while Hydra composes, naming the key. :func:`load_config` then builds the dataclasses, whose
``__post_init__`` checks the allowed values (``align.quantization=nf5``) and required settings
(``data.root``), before any stage runs. The defaults live here and in the libraries' own config
modules (``datamodules/config.py``, ``lightning_modules/config.py``); a YAML option only chooses or
restates them (tests/test_config_schema.py checks that they agree).

Only light modules are imported: ``python run.py --help`` loads this file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from datamodules.config import ConfigError, DataConfig, at_least, one_of
from lightning_modules.config import AlignConfig, LLMConfig

TASKS = ("next", "recovery_multi", "recovery_single", "index2loc", "loc2index", "translation")
STAGES = ("data", "tokenizer", "align", "test")
ON_DEMAND = ("baselines", "predict", "report")


@dataclass
class PathsConfig:
    """Where things go; relative paths are relative to the directory you run from."""

    # Stage artefacts: <artifacts>/<data.name>/data-<hash>/, tokenizer-<name>-<hash>/, <run_name>/.
    artifacts: str = "${oc.env:QTMOB_ARTIFACTS,artifacts}"
    # Downloaded datasets (data.root defaults below it).
    data_dir: str = "${oc.env:QTMOB_DATA,data}"
    # Converted models and embedding caches.
    cache: str = "${oc.env:QTMOB_CACHE,${oc.env:HOME,.}/.cache/qtmob}"


@dataclass
class TokenizerConfig:
    """The location tokenizer (``tokenizer``): an RQ-VAE over description embeddings, or a baseline."""

    name: str = "rqvae_4x64"
    kind: str = "rqvae"                 # rqvae | released (the release's index) | id | random
    embedder: str = "llm"               # llm (mean-pooled last hidden state of the LLM) | minilm
    num_levels: int = 4
    codebook_size: int = 64
    latent_dim: int = 32
    hidden_dims: tuple[int, ...] = (2048, 1024, 512, 256, 128, 64)
    beta: float = 0.25
    lr: float = 1.0e-3
    max_epochs: int = 500
    sinkhorn_epsilon: float = 0.003
    embed_max_length: int = 1024
    embed_batch_size: int = 8
    embed_dtype: str = "auto"           # auto = bfloat16 where bf16 is fast here (hardware.py), else float32
    precision: str = "auto"             # of the MLPs; the quantizer always runs in float32
    batch_size: int = 512
    weight_decay: float = 1.0e-4
    patience: int = 50                  # early stopping (0 = never)
    min_delta: float = 1.0e-4
    reseed_every: int = 20
    coherence_every: int = 25           # km within shared prefixes and category purity, every N epochs (0 = never)
    kmeans_init: bool = True
    repair_rounds: int = 20
    progress_bar: bool = True
    index_file: str = "index_Llama-3.2-1B-Instruct.json"  # tokenizer=released: the file in data.root

    def __post_init__(self) -> None:
        one_of("tokenizer.kind", self.kind, ("rqvae", "released", "id", "random"))
        one_of("tokenizer.embedder", self.embedder, ("llm", "minilm"))
        one_of("tokenizer.embed_dtype", self.embed_dtype, ("auto", "float32", "bfloat16", "float16"))
        one_of("tokenizer.precision", self.precision, ("auto", "32-true", "bf16-mixed", "16-mixed"))
        for key in ("num_levels", "codebook_size", "latent_dim", "max_epochs", "batch_size", "lr"):
            at_least(f"tokenizer.{key}", getattr(self, key), 0, strict=True)


@dataclass
class ObjectivesConfig:
    """Which alignment tasks are mixed per batch (``objectives``)."""

    name: str = "all"
    tasks: tuple[str, ...] = TASKS
    # null: natural proportions (the paper's shuffled concatenation); else a weight per task.
    weights: Optional[dict[str, float]] = None

    def __post_init__(self) -> None:
        for task in self.tasks:
            one_of("objectives.tasks[]", task, TASKS)
        for task in (self.weights or {}):  # weights of tasks left out (objectives=next_only) are unused
            one_of("objectives.weights key", task, TASKS)


@dataclass
class GRUConfig:
    epochs: int = 15                    # the most; the epoch with the best valid Acc@1 + NDCG@5 is kept
    dims: tuple[int, ...] = (64, 128)   # widths tried; the best on the valid split ranks the test cases


@dataclass
class BootstrapConfig:
    resamples: int = 1000
    seed: int = 42  # experiments/eval/default.yaml binds it to the run's seed
    level: float = 0.95


@dataclass
class PredictConfig:
    input: Optional[str] = None         # (required by stage=predict) CSV of one user's check-ins: time,loc_id[,user_id]
    at: Optional[str] = None            # time to predict for (default: one hour after the last check-in)
    top_k: int = 10
    format: str = "csv"

    def __post_init__(self) -> None:
        one_of("eval.predict.format", self.format, ("csv", "json"))
        at_least("eval.predict.top_k", self.top_k, 1)


@dataclass
class EvalConfig:
    """Evaluation (``stage=test``, ``baselines``, ``predict``; ``align/val/acc@1`` during alignment)."""

    tasks: tuple[str, ...] = ("next", "recovery_single")
    num_beams: int = 15
    decoding: str = "beam"              # beam | sampled_beams (the official test: sampling inside the beams)
    batch_size: int = 8
    share_prefix: bool = True           # prefill the prompt tokens a batch shares once (beam decoding; same rankings)
    max_cases: Optional[int] = None     # cap per task (a seeded random subset); null: every case
    top_k: int = 10
    exact_max_locations: int = 400
    exact_cases: int = 16
    val_cases: int = 32
    val_every: int = 1
    val_beams: int = 5
    gru: GRUConfig = field(default_factory=GRUConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def __post_init__(self) -> None:
        for task in self.tasks:
            one_of("eval.tasks[]", task, ("next", "recovery_single"))
        one_of("eval.decoding", self.decoding, ("beam", "sampled_beams"))
        for key in ("num_beams", "batch_size", "top_k", "val_beams", "val_every"):
            at_least(f"eval.{key}", getattr(self, key), 1)
        at_least("eval.max_cases", self.max_cases, 1)


@dataclass
class LoggerConfig:
    kind: str = "tensorboard"           # tensorboard | csv
    save_dir: Optional[str] = None      # null: <run folder>/tb (TensorBoard event files or CSV files)

    def __post_init__(self) -> None:
        one_of("logger.kind", self.kind, ("tensorboard", "csv"))


@dataclass
class ProgressConfig:
    style: str = "auto"                 # auto | bar | lines | none
    every_seconds: float = 30.0
    every_steps: int = 0

    def __post_init__(self) -> None:
        one_of("progress.style", self.style, ("auto", "bar", "lines", "none"))


@dataclass
class ReportConfig:
    sweep: Optional[str] = None         # stage=report: the multirun folder to gather
    task: str = "next"


@dataclass
class CpuRecipeConfig:
    switch: Optional[str] = None        # set by experiments/cpu_switch/*.yaml (the ablation=cpu_recipe grid)


@dataclass
class RunConfig:
    """The whole run: what ``python run.py`` composes, typed."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Lightning Trainer arguments, passed through as they are (pipeline/trainers.py checks the names);
    # precision: auto is resolved per machine (lightning_modules/hardware.py).
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    stage: str = "all"
    seed: int = 42
    force: bool = False
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    run_name: str = "default"
    variant: Optional[str] = None
    # Set by the debug group (debug=fast|limit|overfit): the run folder gets a debug-<name> sub-folder,
    # so that a debug model never takes the place of the experiment's, in a plain run or a sweep.
    debug_run: Optional[str] = None
    report: ReportConfig = field(default_factory=ReportConfig)
    cpu_recipe: CpuRecipeConfig = field(default_factory=CpuRecipeConfig)
    launcher_slurm: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        one_of("stage", self.stage, ("all", *STAGES, *ON_DEMAND))
        recovery = sorted({t for t in (*self.objectives.tasks, *self.eval.tasks) if t.startswith("recovery")})
        if self.data.samples.visit_hint_moves_weight and self.data.samples.visit_hints and recovery:
            raise ConfigError(f"data.samples.visit_hint_moves_weight={self.data.samples.visit_hint_moves_weight:g} with "
                              f"recovery tasks {recovery} (objectives.tasks / eval.tasks): a masked visit's place would show in "
                              "its successor's hint; use objectives=next_only eval.tasks=[next] or a weight of 0")
        s = self.data.samples
        if self.align.hint_smoothing and not (s.visit_hints and s.next_format == "trajectory"):
            raise ConfigError(f"align.hint_smoothing={self.align.hint_smoothing:g} needs hints before each trained code: "
                              f"data.samples.visit_hints > 0 (is {s.visit_hints}) and next_format=trajectory (is {s.next_format}); "
                              "or set it to 0")


def register() -> None:
    """Register :class:`RunConfig` as ``qtmob_schema`` (run.yaml's first default)."""
    ConfigStore.instance().store(name="qtmob_schema", node=RunConfig)


register()


def _key(exc: OmegaConfBaseException) -> str:
    return str(getattr(exc, "full_key", "") or "")


def _unknown_keys(node: Any, cls: Any, prefix: str) -> list[str]:
    """Keys of ``node`` that ``cls`` does not declare (Hydra's ``+key=value`` adds them even to a typed node)."""
    if not (isinstance(node, DictConfig) and dataclasses.is_dataclass(cls)):
        return []
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = []
    for key in node.keys():
        if key not in fields:
            out.append(f"{prefix}{key}")
        elif not OmegaConf.is_missing(node, key) and isinstance(node[key], DictConfig):
            sub = hints[key]
            sub = next((a for a in typing.get_args(sub) if dataclasses.is_dataclass(a)), sub)  # Optional[X] -> X
            out += _unknown_keys(node[key], sub, f"{prefix}{key}.")
    return out


def load_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """The typed :class:`RunConfig` of a composed config; every problem as one :class:`ConfigError` line.

    Resolves interpolations (``${seed}``, ``${oc.env:...}``), fills what the YAML left to the schema,
    and runs the checks of every group."""
    if isinstance(cfg, RunConfig):
        return cfg
    missing: list[str] = []
    try:
        unknown = _unknown_keys(cfg, RunConfig, "")
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; see `python run.py --cfg job` for the keys there are")
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        missing = sorted(k for k in OmegaConf.missing_keys(merged) if not k.startswith("hydra"))
        if missing:
            raise MissingMandatoryValue(f"missing {missing}")
        run = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        key = _key(exc) or ", ".join(missing)
        hint = " (the folder holding the dataset's files; add data.download=true to fetch them)" if key == "data.root" else ""
        raise ConfigError(f"{key} is required: set {key}=...{hint}") from None
    except ConfigKeyError as exc:
        raise ConfigError(f"unknown config key {_key(exc) or str(exc).splitlines()[0]}") from None
    except ValidationError as exc:
        raise ConfigError(f"{_key(exc)}: {str(exc).splitlines()[0]}") from None
    except (ConfigError, OmegaConfBaseException) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    assert isinstance(run, RunConfig)
    return run


def as_dict(obj: Any) -> Any:
    """A config (or part of one) as plain JSON-able containers: fingerprints, hparams, ``config.yaml``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in obj.items()}
    return obj
