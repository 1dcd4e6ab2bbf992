"""``stage=test`` and ``stage=baselines``: ranked predictions, metrics, results files.

Cases (``eval.tasks``): next-location = the last visit of each test trajectory; recovery = the
single-mask test samples (seeded by ``data.samples.seed``). The aligned LLM ranks locations by
constrained beam search over the code trie; every baseline ranks the *same* cases, and one
:class:`~lightning_modules.metrics.RankingMetrics` scores them all.

Files (``<paths.artifacts>/<data.name>/<run_name>/``): ``results.json`` (metrics per model and task,
case counts, seconds, beam-vs-exact agreement) and ``results.md`` (the same as a table).
``stage=baselines`` writes the count baselines alone to ``<paths.artifacts>/<data.name>/baselines/``
in the same format, without any LLM.
"""

from __future__ import annotations

import logging
import time
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.artifacts import write_text_atomic, file_manifest, fingerprint, reusable, tb_dir, write_json_atomic
from datamodules.data_stage import data_dir, data_fingerprint, run_data_stage
from datamodules.dataset import sample_config
from datamodules.errors import DataError
from datamodules.fitting import fit_history
from datamodules.samples import render_samples
from datamodules.user_memory import user_memory
from lightning_modules.baselines import CountBaselines, eval_cases, fit_gru
from lightning_modules.hardware import autocast, compute_device
from lightning_modules.results import TASK_LABEL, bootstrap_by_task, results_markdown, score, score_by_task
from lightning_modules.user_time import UserTimeBaseline, params_dict, tune_user_time

log = logging.getLogger(__name__)

DECODINGS = ("beam", "sampled_beams")


def _read(cfg: DictConfig, name: str) -> pl.DataFrame:
    path = data_dir(cfg) / name
    if not path.is_file():
        raise DataError(f"{path} not found: run the data stage first")
    return pl.read_parquet(path)


def test_index(cfg: DictConfig) -> pl.DataFrame:
    """The evaluated test samples (``eval.tasks``; a seeded random ``eval.max_cases`` per task when set,
    so that a capped evaluation still covers every kind of user rather than the first few)."""
    tasks = list(cfg.eval.tasks)
    unknown = set(tasks) - set(TASK_LABEL)
    if unknown:
        raise DataError(f"eval.tasks {sorted(unknown)} cannot be ranked; choose from {list(TASK_LABEL)}")
    index = _read(cfg, "sample_index.parquet").filter((pl.col("split") == "test") & pl.col("task").is_in(tasks))
    if cfg.eval.get("max_cases"):
        rank = pl.int_range(pl.len()).shuffle(seed=int(cfg.seed)).over("task")
        index = index.filter(rank < int(cfg.eval.max_cases))
    return index


def valid_cases(cfg: DictConfig, checkins: pl.DataFrame) -> pl.DataFrame:
    """The valid-split cases that tune the baselines, built as the test cases are: next-location = the
    last visit of each valid trajectory, recovery = the single-mask valid samples. Never test cases."""
    index = _read(cfg, "sample_index.parquet").filter(
        (pl.col("split") == "valid") & pl.col("task").is_in(list(cfg.eval.tasks))
        & ((pl.col("task") != "next") | pl.col("is_last"))
    )
    return eval_cases(index, checkins)


def baseline_rankings(cfg: DictConfig, cases: pl.DataFrame, checkins: pl.DataFrame, loc_ids: np.ndarray,
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
        gru, info = fit_gru(train, loc_ids, list(g.dims), int(g.epochs), valid.filter(pl.col("task") == "next"), size=top,
                            seed=int(cfg.seed), logger=logger, progress=progress)
        rankings["gru"] = gru.rank(cases)
        tuned["gru"] = {"all": info}
        seconds["gru"] = round(time.perf_counter() - t0, 3)
    return rankings, seconds, tuned


def intervals(cfg: DictConfig, rankings: dict[str, np.ndarray], cases: pl.DataFrame, reference: str | None) -> dict[str, Any]:
    """Paired bootstrap intervals per task (``eval.bootstrap``)."""
    b = cfg.eval.bootstrap
    return bootstrap_by_task(rankings, cases, int(cfg.eval.top_k), reference, resamples=int(b.resamples),
                             seed=int(b.seed), level=float(b.level))


def _write(out: Path, results: dict[str, Any]) -> None:
    """``results.md``, then ``results.json`` (each via a rename); the JSON carries the fingerprint and
    comes last, so a run killed in between is never taken as finished."""
    write_text_atomic(out / "results.md", results_markdown(results))
    results["manifest"] = file_manifest(out, ["results.md"])
    write_json_atomic(out / "results.json", results)


def _complete_model_card(folder: Path, results: dict[str, Any]) -> None:
    """Rewrite the model card with the test metrics (the card is outside the model's manifest)."""
    from lightning_modules.model_card import write_model_card

    meta = json.loads((folder / "qtmob.json").read_text())
    write_model_card(folder, meta, {k: v for k, v in results.items() if k != "manifest"})


def run_baselines_stage(cfg: DictConfig) -> dict[str, Any]:
    """The count baselines alone (no LLM), in the results format, in seconds."""
    run_data_stage(cfg, force=False)
    t0 = time.perf_counter()
    index = test_index(cfg)
    checkins = _read(cfg, "checkins.parquet")
    cases = eval_cases(index, checkins)
    if cases.is_empty():
        raise DataError(f"no test cases for eval.tasks={list(cfg.eval.tasks)} in {data_dir(cfg)}")
    rankings, seconds, tuned = baseline_rankings(cfg, cases, checkins, np.empty(0), with_gru=False)
    results = {
        "fingerprint": fingerprint({"data": data_fingerprint(cfg), "eval": OmegaConf.to_container(cfg.eval, resolve=True)}),
        "dataset": str(cfg.data.name), "run": "baselines",
        "cases": {t: int(n) for t, n in cases.group_by("task", maintain_order=True).len().iter_rows()},
        "metrics": {name: score_by_task(r, cases, int(cfg.eval.top_k)) for name, r in rankings.items()},
        # Without a model, the strongest rule is the reference the others are compared with.
        "reference": "user_time", "intervals": intervals(cfg, rankings, cases, "user_time"), "tuned": tuned,
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
    }
    out = Path(cfg.paths.artifacts) / str(cfg.data.name) / "baselines"
    out.mkdir(parents=True, exist_ok=True)
    _write(out, results)
    return results


# ------------------------------------------------------------------------------------ the LLM
def load_for_eval(cfg: DictConfig, folder: Path, table: Any = None) -> tuple[Any, Any, Any, Any]:
    """The aligned model from its saved folder (quantised as it was trained, in eval mode) with what
    decoding needs.

    Returns:
        ``(model, tokenizer, encoder, trie)``.
    """
    from lightning_modules.align_stage import base_model_path, load_aligned
    from lightning_modules.chat_encoding import ChatEncoder
    from lightning_modules.llm import _DTYPES, align_compute_dtype, align_quantization, quantization_config
    from location_tokenizers.codes import CodeTable
    from location_tokenizers.trie import CodeTrie

    a = cfg.align
    kwargs: dict[str, Any] = {"dtype": _DTYPES[str(a.get("dtype", "float32"))]}
    qc = quantization_config(align_quantization(a), _DTYPES[align_compute_dtype(a)])
    if qc is not None:
        kwargs["quantization_config"] = qc
    if eval_on_gpu(cfg):  # the trainer's device: decoding a 1B model on the CPU would take days
        kwargs["device_map"] = {"": 0}
    model, tokenizer, meta = load_aligned(folder, base_model_path(cfg), **kwargs)
    model.eval()
    table = CodeTable.read_parquet(Path(folder) / "codes.parquet") if table is None else table
    encoder = ChatEncoder(tokenizer, meta["system_prompt"], max_length=int(a.max_length),
                          prompt_format=str(meta.get("prompt_format", "chat")))
    trie = CodeTrie(table, tokenizer, vocab_size=int(model.config.vocab_size)).to(next(model.parameters()).device)
    return model, tokenizer, encoder, trie


def eval_on_gpu(cfg: DictConfig) -> bool:
    """Whether the test and predict stages decode on a GPU (``trainer.accelerator`` gpu/cuda, or auto
    with one present)."""
    return compute_device(str(cfg.trainer.accelerator)) == "cuda"


def rank_prompts(model: torch.nn.Module, encoder: Any, trie: Any, prompts: list[str], num_beams: int,
                 batch_size: int, precision: str = "32-true", decoding: str = "beam", seed: int = 0,
                 progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Constrained beam search over ``prompts`` in length-sorted batches; rows in input order.

    ``precision`` is the run's resolved Lightning precision: ``bf16-mixed`` decodes under bf16
    autocast, as the model was trained (the scores that rank the beams are accumulated in float32).
    ``decoding``: ``beam`` (deterministic) or ``sampled_beams`` (the official protocol, seeded per batch).
    ``progress``: a :class:`lightning_modules.progress.ProgressStyle` to report cases/s and the ETA (None: silent).
    """
    from contextlib import nullcontext
    from functools import partial

    from lightning_modules.constrained_decoding import beam_search, sampled_beam_search

    if decoding not in DECODINGS:
        raise DataError(f"eval.decoding={decoding!r}; choose from {list(DECODINGS)}")

    order = np.argsort([-len(p) for p in prompts], kind="stable")
    locs = np.full((len(prompts), num_beams), -1, dtype=np.int64)
    scores = np.full((len(prompts), num_beams), -np.inf)
    device = next(model.parameters()).device
    with progress.loop("test", len(prompts), "cases") if progress is not None else nullcontext() as bar:
        for start in range(0, len(prompts), batch_size):
            rows = order[start : start + batch_size]
            batch = encoder.prompt_batch([prompts[i] for i in rows], device=device)
            search = beam_search if decoding == "beam" else partial(sampled_beam_search, seed=seed + start, pad_token_id=encoder.pad_id)
            with autocast(precision, device.type):
                ranked = search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=num_beams)
            locs[rows] = ranked.loc_ids.cpu().numpy()
            scores[rows] = ranked.scores.cpu().numpy()
            if bar is not None:
                bar.update(len(rows))
    return locs, scores


def exact_agreement(model: torch.nn.Module, encoder: Any, trie: Any, table: Any, tokenizer: Any, prompts: list[str],
                    beam_locs: np.ndarray, precision: str = "32-true") -> dict[str, float]:
    """How often beam search misses the exact ranking (teacher-forced scores of every code), both
    computed in the run's ``precision``."""
    from lightning_modules.constrained_decoding import exact_scores, rank_exact
    from location_tokenizers.codes import level_token

    tokens = [[level_token(lv, int(c)) for lv, c in enumerate(row)] for row in table.codes.tolist()]
    code_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in tokens], dtype=torch.long)
    device = next(model.parameters()).device
    miss, recall = [], []
    for i, prompt in enumerate(prompts):
        batch = encoder.prompt_batch([prompt], device=device)
        with autocast(precision, device.type):
            scores = exact_scores(model, batch["input_ids"], batch["attention_mask"], code_ids)
        exact = rank_exact(scores, torch.as_tensor(table.loc_ids), top=10).loc_ids[0].cpu().numpy()
        miss.append(float(exact[0] != beam_locs[i, 0]))
        recall.append(len(set(exact.tolist()) & set(beam_locs[i].tolist())) / len(exact))
    return {"cases": len(prompts), "top1_miss_rate": float(np.mean(miss)), "top10_recall": float(np.mean(recall))}


def test_fingerprint(cfg: DictConfig) -> str:
    from lightning_modules.align_stage import align_fingerprint

    return fingerprint({"align": align_fingerprint(cfg), "eval": OmegaConf.to_container(cfg.eval, resolve=True)})


def run_test_stage(cfg: DictConfig, force: bool | None = None) -> dict[str, Any]:
    """Evaluate the aligned model and every baseline on the same test cases."""
    from lightning_modules.align_stage import run_align_stage, run_dir, run_precision
    from lightning_modules.dashboards import flat_hparams, log_run, tensorboard_logger
    from lightning_modules.progress import ProgressStyle
    from location_tokenizers.codes import CodeTable

    force = bool(cfg.get("force", False)) if force is None else force
    run_align_stage(cfg, force=False)
    out = run_dir(cfg)
    fp = test_fingerprint(cfg)
    if (old := reusable(out, "results.json", ("results.json", "results.md"), fp, force, "test")) is not None:
        return old
    t0 = time.perf_counter()
    torch.manual_seed(int(cfg.seed))
    table = CodeTable.read_parquet(out / "model" / "codes.parquet")
    model, tokenizer, encoder, trie = load_for_eval(cfg, out / "model", table)
    index = test_index(cfg)
    checkins = _read(cfg, "checkins.parquet")
    locations, profiles, sample_cfg = _read(cfg, "locations.parquet"), _read(cfg, "profiles.parquet"), sample_config(cfg.data)
    memory = user_memory(checkins, table.strings(), sample_cfg.user_places)
    render = lambda ix: render_samples(ix, checkins, table.strings(), locations, profiles, sample_cfg, memory)  # noqa: E731
    # The training length rule: a prompt over align.max_length loses its oldest visits.
    samples, cut = fit_history(index, render(index), render, encoder.lengths, encoder.max_length)
    cases = eval_cases(index, checkins).join(samples.select("sample_id", "prompt", "response_prefix"), on="sample_id", how="left")
    if cases.is_empty():
        raise DataError(f"no test cases for eval.tasks={list(cfg.eval.tasks)} in {data_dir(cfg)}")
    prompts = encoder.prompt_texts(cases)
    e = cfg.eval
    t_llm = time.perf_counter()
    precision = run_precision(cfg)
    progress = ProgressStyle.from_mapping(cfg.get("progress"))
    locs, _ = rank_prompts(model, encoder, trie, prompts, int(e.num_beams), int(e.batch_size), precision=precision,
                           decoding=str(e.get("decoding", "beam")), seed=int(cfg.seed), progress=progress)
    llm_seconds = time.perf_counter() - t_llm
    logger = tensorboard_logger(tb_dir(cfg), "test")
    rankings, seconds, tuned = baseline_rankings(cfg, cases, checkins, table.loc_ids, with_gru=True, logger=logger,
                                                 progress=progress)
    top = int(e.top_k)
    model_name = f"QT-Mob ({cfg.llm.name})"
    metrics = {model_name: score_by_task(locs, cases, top)}
    metrics.update({name: score_by_task(r, cases, top) for name, r in rankings.items()})
    bounds = intervals(cfg, {model_name: locs, **rankings}, cases, model_name)
    exact = {}
    if len(table) <= int(e.exact_max_locations) and int(e.exact_cases) > 0:
        for task in cases["task"].unique(maintain_order=True).to_list():
            rows = np.flatnonzero(cases["task"].to_numpy() == task)[: int(e.exact_cases)]
            exact[task] = exact_agreement(model, encoder, trie, table, tokenizer, [prompts[i] for i in rows], locs[rows],
                                          precision=precision)
    results = {
        "fingerprint": fp, "dataset": str(cfg.data.name), "run": str(cfg.run_name), "llm": str(cfg.llm.name),
        "tokenizer": str(cfg.tokenizer.name), "num_beams": int(e.num_beams), "precision": precision,
        "cases": {t: int(n) for t, n in cases.group_by("task", maintain_order=True).len().iter_rows()}, "cut_history": cut,
        "metrics": metrics, "reference": model_name, "intervals": bounds, "tuned": tuned, "exact": exact,
        "seconds": {"llm_ranking": round(llm_seconds, 2), "llm_per_case": round(llm_seconds / cases.height, 4), **seconds,
                    "total": round(time.perf_counter() - t0, 2)},
    }
    _write(out, results)
    _complete_model_card(out / "model", results)
    flat = {f"test/{task}/{k}": v for task, m in metrics[model_name].items() for k, v in m.items()}
    for name, per_task in metrics.items():
        if name != model_name:
            flat.update({f"test/baselines/{name}/{task}/{k}": v for task, m in per_task.items() for k, v in m.items()})
    log_run(logger, flat_hparams(OmegaConf.to_container(cfg, resolve=True)),
            {k: v for k, v in flat.items() if not k.startswith("test/baselines/")})
    logger.log_metrics(flat, step=0)
    logger.experiment.add_text("test/results", results_markdown(results), global_step=0)
    logger.finalize("success")
    log.info("test: %d cases (history cut to fit max_length: %s), LLM ranking %.1f s -> %s", cases.height, cut, llm_seconds,
             out / "results.md")
    return results


# ------------------------------------------------------------------------------------ predict
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M")


def _parse_time(text: str):
    from datetime import datetime

    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(text.strip(), fmt)
        except ValueError:
            continue
    return None


def read_user_checkins(path: str | Path, known_locations: set[int]) -> pl.DataFrame:
    """A user's recent check-ins for ``stage=predict``: CSV with ``time`` (local, ISO) and ``loc_id``,
    optionally ``user_id``. Every bad row is reported with its line number; none is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.predict.input={path}: file not found")
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure becomes one clear message
        raise DataError(f"{path}: not a readable CSV ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    missing = {"time", "loc_id"} - set(raw.columns)
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {sorted(missing)}; expected time,loc_id[,user_id], got {raw.columns}")
    if raw.is_empty():
        raise DataError(f"{path}: no check-ins")
    problems, times, locs = [], [], []
    for i, (t, loc) in enumerate(raw.select("time", "loc_id").iter_rows(), start=2):
        when = _parse_time(t or "")
        if when is None:
            problems.append(f"line {i}: time {t!r} is not like 2012-04-03 18:00:09")
        try:
            loc_id = int(loc)
        except (TypeError, ValueError):
            problems.append(f"line {i}: loc_id {loc!r} is not an integer")
            loc_id = None
        if loc_id is not None and loc_id not in known_locations:
            problems.append(f"line {i}: loc_id {loc_id} is not a location of this dataset")
        times.append(when)
        locs.append(loc_id)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:5]) + more)
    users = raw["user_id"].to_list() if "user_id" in raw.columns else [None] * raw.height
    if len({u for u in users if u}) > 1:
        raise DataError(f"{path}: check-ins of several users ({sorted({u for u in users if u})[:3]}...); give one user's")
    return pl.DataFrame({"local_time": times, "loc_id": locs, "user_id": [users[0] or "anonymous"] * raw.height}).sort("local_time")


def run_predict_stage(cfg: DictConfig) -> dict[str, Any]:
    """Top-k next locations for one user's recent check-ins (``eval.predict.input``), printed as CSV or JSON."""
    from datetime import timedelta

    from lightning_modules.align_stage import run_dir, run_precision
    from lightning_modules.constrained_decoding import beam_search
    from location_tokenizers.codes import CodeTable
    from datamodules.samples import INDEX_SCHEMA

    p = cfg.eval.predict
    if not p.get("input"):
        raise DataError("stage=predict needs eval.predict.input=<csv with time,loc_id[,user_id]>")
    folder = run_dir(cfg) / "model"
    if not (folder / "qtmob.json").is_file():
        raise DataError(f"{folder} has no aligned model: run stage=align (or the whole pipeline) with this config first")
    fmt = str(p.format)
    if fmt not in ("csv", "json"):
        raise DataError(f"eval.predict.format={fmt!r}; choose csv or json")
    table = CodeTable.read_parquet(folder / "codes.parquet")
    try:
        top = int(p.top_k)
    except (TypeError, ValueError):
        top = 0
    if not 1 <= top <= len(table):
        raise DataError(f"eval.predict.top_k={p.top_k!r}; choose a whole number from 1 to {len(table)} (the locations this model knows)")
    visits = read_user_checkins(p.input, set(table.loc_ids.tolist()))
    at = _parse_time(str(p.at)) if p.get("at") else visits["local_time"].max() + timedelta(hours=1)
    if at is None:
        raise DataError(f"eval.predict.at={p.at!r} is not like 2012-04-03 18:00:09")
    if at <= visits["local_time"].max():
        raise DataError(f"eval.predict.at={at} is not after the last check-in of {p.input} ({visits['local_time'].max()}): "
                        "give a time to predict for that follows the history")
    user = str(visits["user_id"][0])
    known_users = set(_read(cfg, "checkins.parquet").filter(pl.col("split") == "train")["user_id"].unique().to_list())
    if user not in known_users:
        log.warning("predict: user %r has no train check-ins (cold start): the prompt has no profile, and the model "
                    "predicts from these %d visits alone", user, visits.height)
    n = visits.height
    traj = pl.concat([visits, pl.DataFrame({"local_time": [at], "loc_id": [visits["loc_id"][-1]], "user_id": [visits["user_id"][0]]})])
    traj = traj.with_columns(traj_id=pl.lit("predict"), utc_time=pl.col("local_time").dt.replace_time_zone("UTC"))
    max_history = int(sample_config(cfg.data).max_history)
    index = pl.DataFrame([{"task": "next", "split": "test", "traj_id": "predict", "user_id": visits["user_id"][0],
                           "start": max(0, n - max_history), "end": n, "target_pos": n, "masked": None, "loc_id": None,
                           "template": 0, "is_last": True}], schema=INDEX_SCHEMA)
    locations = _read(cfg, "locations.parquet")
    profiles, sample_cfg = _read(cfg, "profiles.parquet"), sample_config(cfg.data)
    memory = user_memory(_read(cfg, "checkins.parquet"), table.strings(), sample_cfg.user_places)
    render = lambda ix: render_samples(ix, traj, table.strings(), locations, profiles, sample_cfg, memory)  # noqa: E731
    model, _, encoder, trie = load_for_eval(cfg, folder, table)
    samples, _ = fit_history(index, render(index), render, encoder.lengths, encoder.max_length)
    batch = encoder.prompt_batch(encoder.prompt_texts(samples), device=next(model.parameters()).device)
    with autocast(run_precision(cfg), batch["input_ids"].device.type):
        ranked = beam_search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=max(top, int(cfg.eval.num_beams)))
    preds = pl.DataFrame({"rank": list(range(1, top + 1)), "loc_id": ranked.loc_ids[0, :top].tolist(),
                          "log_prob": [round(float(x), 4) for x in ranked.scores[0, :top]]})
    # Beam search returns -1 only when fewer codes exist than beams; never print those as predictions.
    preds = preds.filter(pl.col("loc_id") >= 0)
    preds = preds.join(locations.select("loc_id", "lat", "lon", "category", "name"), on="loc_id", how="left").sort("rank")
    text = preds.write_json() if fmt == "json" else preds.write_csv()
    print(text)
    return {"at": str(at), "user_id": visits["user_id"][0], "cold_start": user not in known_users, "predictions": preds.to_dicts()}


__all__ = ["read_user_checkins", "results_markdown", "run_baselines_stage", "run_predict_stage", "run_test_stage", "score", "test_index"]
