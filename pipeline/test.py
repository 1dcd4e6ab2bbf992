"""``stage=test`` and ``stage=baselines``: ranked predictions, metrics, results files.

Cases (``eval.tasks``): next-location = the last visit of each test trajectory; recovery = the
single-mask test samples (seeded by ``data.samples.seed``). The aligned LLM ranks locations by
constrained beam search over the code trie; every baseline ranks the *same* cases, and one
:class:`~lightning_modules.metrics.RankingMetrics` scores them all.

Files (``<paths.artifacts>/<data.name>/<run_name>/``): ``results.json`` (metrics per model and task,
case counts, seconds, beam-vs-exact agreement), ``results.md`` (the same as a table) and
``rankings.parquet`` (every row's ranked list per case, the LLM's beam scores: for paired comparisons
between runs).
``stage=baselines`` writes the count baselines alone to ``<paths.artifacts>/<data.name>/baselines/``
in the same format, without any LLM.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
import torch

from datamodules.artifacts import (
    atomic_file,
    file_manifest,
    fingerprint,
    reusable,
    write_json_atomic,
    write_text_atomic,
)
from datamodules.errors import DataError
from datamodules.fitting import fit_history
from datamodules.rendering import sample_renderer
from lightning_modules.aligned_model import load_aligned
from lightning_modules.baselines import CountBaselines, eval_cases, fit_gru
from lightning_modules.chat_encoding import ChatEncoder
from lightning_modules.dashboards import flat_hparams, log_run
from lightning_modules.hardware import compute_device
from lightning_modules.llm import (
    _DTYPES,
    align_compute_dtype,
    align_quantization,
    model_path,
    quantization_config,
)
from lightning_modules.model_card import write_model_card
from lightning_modules.progress import ProgressStyle
from lightning_modules.ranking import exact_agreement, rank_prompts
from lightning_modules.results import (
    TASK_LABEL,
    bootstrap_by_task,
    first_guesses,
    hit_split,
    results_markdown,
    score_by_task,
)
from lightning_modules.user_time import UserTimeBaseline, params_dict, tune_user_time
from location_tokenizers.codes import CodeTable
from location_tokenizers.trie import CodeTrie
from pipeline.config import RunConfig, as_dict, load_config
from pipeline.paths import (
    data_dir,
    data_fingerprint,
    read_data,
    run_dir,
    run_precision,
    test_fingerprint,
)
from pipeline.trainers import make_logger, make_trainer

log = logging.getLogger(__name__)

def test_index(cfg: RunConfig) -> pl.DataFrame:
    """The evaluated test samples (``eval.tasks``; a seeded random ``eval.max_cases`` per task when set,
    so that a capped evaluation still covers every kind of user rather than the first few)."""
    tasks = list(cfg.eval.tasks)
    unknown = set(tasks) - set(TASK_LABEL)
    if unknown:
        raise DataError(f"eval.tasks {sorted(unknown)} cannot be ranked; choose from {list(TASK_LABEL)}")
    index = read_data(cfg, "sample_index.parquet").filter((pl.col("split") == "test") & pl.col("task").is_in(tasks))
    if cfg.eval.max_cases:
        rank = pl.int_range(pl.len()).shuffle(seed=int(cfg.seed)).over("task")
        index = index.filter(rank < int(cfg.eval.max_cases))
    return index


def valid_index(cfg: RunConfig) -> pl.DataFrame:
    """The valid-split samples built as the test cases are: next-location = the last visit of each valid
    trajectory, recovery = the single-mask valid samples."""
    return read_data(cfg, "sample_index.parquet").filter(
        (pl.col("split") == "valid") & pl.col("task").is_in(list(cfg.eval.tasks))
        & ((pl.col("task") != "next") | pl.col("is_last"))
    )


def valid_cases(cfg: RunConfig, checkins: pl.DataFrame) -> pl.DataFrame:
    """The valid-split cases (:func:`valid_index`) that tune the baselines. Never test cases."""
    return eval_cases(valid_index(cfg), checkins)


def baseline_rankings(cfg: RunConfig, cases: pl.DataFrame, checkins: pl.DataFrame, loc_ids: np.ndarray,
                      with_gru: bool, logger: Any = None, progress: Any = None) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, Any]]:
    """Rankings of every baseline on ``cases``, the seconds each took (fit + tuning + rank) and what
    was tuned on the valid split (``user_time`` weights per task, the GRU's width and epochs)."""
    train = checkins.filter(pl.col("split") == "train")
    valid = valid_cases(cfg, checkins)
    top = int(cfg.eval.top_k)
    rankings, seconds, tuned = {}, {}, {}
    t0 = time.perf_counter()
    counts = CountBaselines(train, size=top)
    for name in counts.names:
        rankings[name] = counts.rank(name, cases)
    seconds["count_baselines"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    user_time = UserTimeBaseline(train, size=top)
    ranked = np.full((cases.height, top), -1, dtype=np.int64)
    tuned["user_time"] = {}
    for task in cases["task"].unique(maintain_order=True).to_list():
        rows = np.flatnonzero(cases["task"].to_numpy() == task)
        params, figures = tune_user_time(user_time, valid.filter(pl.col("task") == task))
        ranked[rows] = user_time.rank(cases[rows], params)
        tuned["user_time"][task] = {**params_dict(params), "valid": figures}
    rankings["user_time"] = ranked
    seconds["user_time"] = round(time.perf_counter() - t0, 3)
    if with_gru:
        t0 = time.perf_counter()
        g = cfg.eval.gru
        def gru_trainer(label: str, **kwargs: Any):
            return make_trainer(cfg, label, logger=logger or False, layout=False, quiet=progress is None, **kwargs)

        gru, info = fit_gru(train, loc_ids, list(g.dims), int(g.epochs), valid.filter(pl.col("task") == "next"), size=top,
                            seed=cfg.seed, trainer_factory=gru_trainer)
        rankings["gru"] = gru.rank(cases)
        tuned["gru"] = {"all": info}
        seconds["gru"] = round(time.perf_counter() - t0, 3)
    return rankings, seconds, tuned


def intervals(cfg: RunConfig, rankings: dict[str, np.ndarray], cases: pl.DataFrame, reference: str | None) -> dict[str, Any]:
    """Paired bootstrap intervals per task (``eval.bootstrap``)."""
    b = cfg.eval.bootstrap
    return bootstrap_by_task(rankings, cases, int(cfg.eval.top_k), reference, resamples=int(b.resamples),
                             seed=int(b.seed), level=float(b.level))


RANKINGS = "rankings.parquet"
RESULT_FILES = ("results.json", "results.md", RANKINGS)


def rankings_frame(cases: pl.DataFrame, rankings: dict[str, np.ndarray], scores: dict[str, np.ndarray] | None = None) -> pl.DataFrame:
    """Every row's ranked list per case: ``sample_id, task, traj_id, target_pos, target_loc`` (the last four say
    which case it is, whatever the sampling) and one list column per row (its
    name), plus ``<name> scores`` for the rows that have them (the LLM's beam log-probabilities). What a
    paired comparison of two runs on the same cases needs (``stage=report``)."""
    frame = cases.select("sample_id", "task", "traj_id", "target_pos", "target_loc")
    columns = [pl.Series(name, np.asarray(r, dtype=np.int64).tolist(), dtype=pl.List(pl.Int64)) for name, r in rankings.items()]
    columns += [pl.Series(f"{name} scores", np.asarray(v, dtype=np.float64).tolist(), dtype=pl.List(pl.Float64))
                for name, v in (scores or {}).items()]
    return frame.with_columns(columns)


def _write(out: Path, results: dict[str, Any], rankings: pl.DataFrame) -> None:
    """``rankings.parquet`` and ``results.md``, then ``results.json`` (each via a rename); the JSON carries
    the fingerprint and the others' manifest and comes last, so a run killed in between is never taken as finished."""
    with atomic_file(out / RANKINGS) as tmp:
        rankings.write_parquet(tmp)
    write_text_atomic(out / "results.md", results_markdown(results))
    results["manifest"] = file_manifest(out, ["results.md", RANKINGS])
    write_json_atomic(out / "results.json", results)


def _complete_model_card(folder: Path, results: dict[str, Any]) -> None:
    """Rewrite the model card with the test metrics (the card is outside the model's manifest)."""

    meta = json.loads((folder / "qtmob.json").read_text())
    write_model_card(folder, meta, {k: v for k, v in results.items() if k != "manifest"})


def run_baselines_stage(cfg: RunConfig) -> dict[str, Any]:
    """The count baselines alone (no LLM), in the results format, in seconds."""
    cfg = load_config(cfg)
    t0 = time.perf_counter()
    index = test_index(cfg)
    checkins = read_data(cfg, "checkins.parquet")
    cases = eval_cases(index, checkins)
    if cases.is_empty():
        raise DataError(f"no test cases for eval.tasks={list(cfg.eval.tasks)} in {data_dir(cfg)}")
    rankings, seconds, tuned = baseline_rankings(cfg, cases, checkins, np.empty(0), with_gru=False)
    results = {
        "fingerprint": fingerprint({"data": data_fingerprint(cfg), "eval": as_dict(cfg.eval)}),
        "dataset": str(cfg.data.name), "run": "baselines",
        "cases": {t: int(n) for t, n in cases.group_by("task", maintain_order=True).len().iter_rows()},
        "metrics": {name: score_by_task(r, cases, int(cfg.eval.top_k)) for name, r in rankings.items()},
        # Without a model, the strongest rule is the reference the others are compared with.
        "reference": "user_time", "intervals": intervals(cfg, rankings, cases, "user_time"),
        "hit_split": hit_split(rankings, cases, "user_time"), "tuned": tuned,
        "first_guesses": first_guesses(rankings, cases),
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
    }
    out = Path(cfg.paths.artifacts) / str(cfg.data.name) / "baselines"
    out.mkdir(parents=True, exist_ok=True)
    _write(out, results, rankings_frame(cases, rankings))
    return results


# ------------------------------------------------------------------------------------ the LLM
class LoadedModel(NamedTuple):
    """An aligned model ready to decode (:func:`load_for_eval`)."""

    model: Any
    tokenizer: Any
    encoder: ChatEncoder
    trie: CodeTrie
    meta: dict[str, Any]  # its qtmob.json: prompt layout and how it was trained


def load_for_eval(cfg: RunConfig, folder: Path, table: Any = None) -> LoadedModel:
    """The aligned model from its saved folder (quantised as it was trained, in eval mode) with what
    decoding needs and its ``qtmob.json``."""

    a = cfg.align
    kwargs: dict[str, Any] = {"dtype": _DTYPES[a.dtype]}
    qc = quantization_config(align_quantization(a), _DTYPES[align_compute_dtype(a)])
    if qc is not None:
        kwargs["quantization_config"] = qc
    if eval_on_gpu(cfg):  # the trainer's device: decoding a 1B model on the CPU would take days
        kwargs["device_map"] = {"": 0}
    base = None if cfg.llm.source == "random" else model_path(cfg.llm, cfg.paths.cache)  # this machine's copy
    model, tokenizer, meta = load_aligned(folder, base, **kwargs)
    model.eval()
    table = CodeTable.read_parquet(Path(folder) / "codes.parquet") if table is None else table
    encoder = ChatEncoder(tokenizer, meta["system_prompt"], max_length=int(a.max_length),
                          prompt_format=str(meta.get("prompt_format", "chat")))
    trie = CodeTrie(table, tokenizer, vocab_size=int(model.config.vocab_size)).to(next(model.parameters()).device)
    return LoadedModel(model, tokenizer, encoder, trie, meta)


def test_prompts(cfg: RunConfig, table: CodeTable, encoder: ChatEncoder, checkins: pl.DataFrame,
                 index: pl.DataFrame | None = None) -> tuple[pl.DataFrame, list[str], dict[str, int]]:
    """The test cases (:func:`test_index`, or the samples of ``index``), their prompts as the model reads
    them, and how many lost their oldest visits to ``align.max_length`` (the training length rule), per task."""
    index = test_index(cfg) if index is None else index
    locations, profiles, sample_cfg = read_data(cfg, "locations.parquet"), read_data(cfg, "profiles.parquet"), cfg.data.samples
    render = sample_renderer(checkins, table.strings(), locations, profiles, sample_cfg)
    samples, cut = fit_history(index, render(index), render, encoder.lengths, encoder.max_length)
    cases = eval_cases(index, checkins).join(samples.select("sample_id", "prompt", "response_prefix"), on="sample_id", how="left")
    if cases.is_empty():
        raise DataError(f"no test cases for eval.tasks={list(cfg.eval.tasks)} in {data_dir(cfg)}")
    return cases, encoder.prompt_texts(cases), cut


def eval_on_gpu(cfg: RunConfig) -> bool:
    """Whether the test and predict stages decode on a GPU (``trainer.accelerator`` gpu/cuda, or auto
    with one present)."""
    return compute_device(str(cfg.trainer.get("accelerator", "auto"))) == "cuda"


def run_test_stage(cfg: RunConfig, force: bool | None = None) -> dict[str, Any]:
    """Evaluate the aligned model and every baseline on the same test cases."""

    cfg = load_config(cfg)
    force = cfg.force if force is None else force
    out = run_dir(cfg)
    fp = test_fingerprint(cfg)
    if (old := reusable(out, "results.json", RESULT_FILES, fp, force, "test")) is not None:
        return old
    t0 = time.perf_counter()
    if not (out / "align.json").is_file():
        raise DataError(f"{out} has no aligned model: run stage=align (or the whole pipeline) with this config first")
    torch.manual_seed(int(cfg.seed))
    table = CodeTable.read_parquet(out / "model" / "codes.parquet")
    model, tokenizer, encoder, trie, _ = load_for_eval(cfg, out / "model", table)
    checkins = read_data(cfg, "checkins.parquet")
    cases, prompts, cut = test_prompts(cfg, table, encoder, checkins)
    e = cfg.eval
    t_llm = time.perf_counter()
    precision = run_precision(cfg)
    progress = ProgressStyle.from_mapping(vars(cfg.progress))
    locs, beam_scores = rank_prompts(model, encoder, trie, prompts, int(e.num_beams), int(e.batch_size), precision=precision,
                           decoding=e.decoding, seed=int(cfg.seed), progress=progress, share_prefix=bool(e.share_prefix),
                           code_softmax=cfg.align.code_softmax)
    llm_seconds = time.perf_counter() - t_llm
    logger = make_logger(cfg, "test")
    rankings, seconds, tuned = baseline_rankings(cfg, cases, checkins, table.loc_ids, with_gru=True, logger=logger,
                                                 progress=progress)
    top = int(e.top_k)
    model_name = f"QT-Mob ({cfg.llm.name})"
    metrics = {model_name: score_by_task(locs, cases, top)}
    metrics.update({name: score_by_task(r, cases, top) for name, r in rankings.items()})
    every = {model_name: locs, **rankings}  # the model first, then each baseline: the rows of every table
    bounds = intervals(cfg, every, cases, model_name)
    exact = {}
    if len(table) <= int(e.exact_max_locations) and int(e.exact_cases) > 0:
        for task in cases["task"].unique(maintain_order=True).to_list():
            rows = np.flatnonzero(cases["task"].to_numpy() == task)[: int(e.exact_cases)]
            exact[task] = exact_agreement(model, encoder, trie, table, tokenizer, [prompts[i] for i in rows], locs[rows],
                                          precision=precision, code_softmax=cfg.align.code_softmax)
    results = {
        "fingerprint": fp, "dataset": str(cfg.data.name), "run": str(cfg.run_name), "llm": str(cfg.llm.name),
        "tokenizer": str(cfg.tokenizer.name), "num_beams": int(e.num_beams), "precision": precision,
        "cases": {t: int(n) for t, n in cases.group_by("task", maintain_order=True).len().iter_rows()}, "cut_history": cut,
        "metrics": metrics, "reference": model_name, "intervals": bounds,
        "hit_split": hit_split(every, cases, model_name), "tuned": tuned, "exact": exact,
        "first_guesses": first_guesses(every, cases),
        "seconds": {"llm_ranking": round(llm_seconds, 2), "llm_per_case": round(llm_seconds / cases.height, 4), **seconds,
                    "total": round(time.perf_counter() - t0, 2)},
    }
    _write(out, results, rankings_frame(cases, every, {model_name: beam_scores}))
    _complete_model_card(out / "model", results)
    flat = {f"test/{task}/{k}": v for task, m in metrics[model_name].items() for k, v in m.items()}
    for name, per_task in metrics.items():
        if name != model_name:
            flat.update({f"test/baselines/{name}/{task}/{k}": v for task, m in per_task.items() for k, v in m.items()})
    log_run(logger, flat_hparams(as_dict(cfg)),
            {k: v for k, v in flat.items() if not k.startswith("test/baselines/")})
    logger.log_metrics(flat, step=0)
    if hasattr(logger.experiment, "add_text"):  # TensorBoard; a CSV logger has the metrics file only
        logger.experiment.add_text("test/results", results_markdown(results), global_step=0)
    logger.finalize("success")
    log.info("test: %d cases (history cut to fit max_length: %s), LLM ranking %.1f s -> %s", cases.height, cut, llm_seconds,
             out / "results.md")
    return results


__all__ = ["RANKINGS", "LoadedModel", "load_for_eval", "rankings_frame", "run_baselines_stage", "run_test_stage", "test_index",
           "test_prompts", "valid_cases", "valid_index"]
