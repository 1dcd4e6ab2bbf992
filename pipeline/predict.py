"""``stage=predict``: the top-k next locations for one user's recent check-ins, from an aligned model."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import polars as pl

from datamodules.artifacts import reusable
from datamodules.config import SampleConfig
from datamodules.errors import DataError
from datamodules.fitting import fit_history
from datamodules.rendering import sample_renderer
from datamodules.samples import INDEX_SCHEMA
from datamodules.user_checkins import parse_time, read_user_checkins
from lightning_modules.constrained_decoding import beam_search
from lightning_modules.hardware import autocast
from location_tokenizers.codes import CodeTable
from pipeline.align import ALIGN_FILES
from pipeline.config import RunConfig, load_config
from pipeline.paths import RENDER_KEYS, align_fingerprint, read_data, run_dir, run_precision
from pipeline.test import load_for_eval

log = logging.getLogger(__name__)


def trained_settings(meta: dict[str, Any], samples: SampleConfig, code_softmax: str,
                     fingerprint_matches: bool = False) -> tuple[SampleConfig, str]:
    """How the aligned model learnt to read prompts: the rendering switches (:data:`pipeline.paths.RENDER_KEYS`,
    ``next_format``) and ``training.code_softmax`` its ``qtmob.json`` records, over this run's ``samples`` and
    ``code_softmax`` (kept where an older model card lacks a key). A run setting that disagrees is logged and
    not used: a prompt written another way, or beams normalised another way, is not what the model was trained on.

    A model with visit hints in whole-trajectory samples whose ``qtmob.json`` lacks ``training.hint_labels``
    may predate the label fix (session 37) and is warned about, unless ``fingerprint_matches``: its
    ``align.json`` fingerprint equals this config's, which carries the fix's marker (models aligned after the
    fix but before ``qtmob.json`` recorded it).
    """
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in ("next_format", *RENDER_KEYS)}
    trained = {"code_softmax": str(meta.get("training", {}).get("code_softmax", code_softmax))}
    asked = {k: getattr(samples, k) for k in recorded} | {"code_softmax": code_softmax}
    for key, value in (recorded | trained).items():
        if asked[key] != value:
            log.warning("predict: the model was aligned with %s=%r; this run's %r is not used", key, value, asked[key])
    hinted = recorded.get("visit_hints") and recorded.get("next_format") == "trajectory"
    if hinted and not meta.get("training", {}).get("hint_labels") and not fingerprint_matches:
        log.warning("predict: the model was aligned with visit hints in whole-trajectory samples and neither its "
                    "qtmob.json (training.hint_labels) nor its align.json fingerprint shows the label fix: if aligned "
                    "before it, it was trained on the hints' code tokens as much as on the visits'; realign it "
                    "(stage=align force=true) before trusting its predictions")
    return dataclasses.replace(samples, **recorded), trained["code_softmax"]


def run_predict_stage(cfg: RunConfig) -> dict[str, Any]:
    """Top-k next locations for one user's recent check-ins (``eval.predict.input``), printed as CSV or JSON."""
    from datetime import timedelta


    cfg = load_config(cfg)
    p = cfg.eval.predict
    if not p.input:
        raise DataError("stage=predict needs eval.predict.input=<csv with time,loc_id[,user_id]>")
    folder = run_dir(cfg) / "model"
    if not (folder / "qtmob.json").is_file():
        raise DataError(f"{folder} has no aligned model: run stage=align (or the whole pipeline) with this config first")
    fmt = p.format
    table = CodeTable.read_parquet(folder / "codes.parquet")
    top = p.top_k
    if not 1 <= top <= len(table):
        raise DataError(f"eval.predict.top_k={p.top_k!r}; choose a whole number from 1 to {len(table)} (the locations this model knows)")
    visits = read_user_checkins(p.input, set(table.loc_ids.tolist()))
    at = parse_time(str(p.at)) if p.at else visits["local_time"].max() + timedelta(hours=1)
    if at is None:
        raise DataError(f"eval.predict.at={p.at!r} is not like 2012-04-03 18:00:09")
    if at <= visits["local_time"].max():
        raise DataError(f"eval.predict.at={at} is not after the last check-in of {p.input} ({visits['local_time'].max()}): "
                        "give a time to predict for that follows the history")
    user = str(visits["user_id"][0])
    checkins = read_data(cfg, "checkins.parquet")
    known_users = set(checkins.filter(pl.col("split") == "train")["user_id"].unique().to_list())
    if user not in known_users:
        log.warning("predict: user %r has no train check-ins (cold start): the prompt has no profile, and the model "
                    "predicts from these %d visits alone", user, visits.height)
    n = visits.height
    traj = pl.concat([visits, pl.DataFrame({"local_time": [at], "loc_id": [visits["loc_id"][-1]], "user_id": [visits["user_id"][0]]})])
    traj = traj.with_columns(traj_id=pl.lit("predict"), utc_time=pl.col("local_time").dt.replace_time_zone("UTC"))
    max_history = cfg.data.samples.max_history
    index = pl.DataFrame([{"task": "next", "split": "test", "traj_id": "predict", "user_id": visits["user_id"][0],
                           "start": max(0, n - max_history), "end": n, "target_pos": n, "masked": None, "loc_id": None,
                           "template": 0, "is_last": True}], schema=INDEX_SCHEMA)
    locations = read_data(cfg, "locations.parquet")
    model, _, encoder, trie, meta = load_for_eval(cfg, folder, table)
    # The align stage's own reuse check: its align.json fingerprint (the fix's marker included) and files match this config.
    current = reusable(run_dir(cfg), "align.json", ALIGN_FILES, align_fingerprint(cfg), force=False) is not None
    sample_cfg, code_softmax = trained_settings(meta, cfg.data.samples, str(cfg.align.code_softmax), fingerprint_matches=current)
    profiles = read_data(cfg, "profiles.parquet")
    render = sample_renderer(checkins, table.strings(), locations, profiles, sample_cfg, visits=traj)
    samples, _ = fit_history(index, render(index), render, encoder.lengths, encoder.max_length)
    batch = encoder.prompt_batch(encoder.prompt_texts(samples), device=next(model.parameters()).device)
    with autocast(run_precision(cfg), batch["input_ids"].device.type):
        ranked = beam_search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=max(top, cfg.eval.num_beams),
                             code_softmax=code_softmax)
    preds = pl.DataFrame({"rank": list(range(1, top + 1)), "loc_id": ranked.loc_ids[0, :top].tolist(),
                          "log_prob": [round(float(x), 4) for x in ranked.scores[0, :top]]})
    # Beam search returns -1 only when fewer codes exist than beams; never print those as predictions.
    preds = preds.filter(pl.col("loc_id") >= 0)
    preds = preds.join(locations.select("loc_id", "lat", "lon", "category", "name"), on="loc_id", how="left").sort("rank")
    text = preds.write_json() if fmt == "json" else preds.write_csv()
    print(text)
    return {"at": str(at), "user_id": visits["user_id"][0], "cold_start": user not in known_users, "predictions": preds.to_dicts()}
