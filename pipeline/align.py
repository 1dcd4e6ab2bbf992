"""``stage=align``: (Q)LoRA alignment of the LLM with the location tokens.

Folder ``<paths.artifacts>/<data.name>/<run_name>/`` (beside ``tb/``, the TensorBoard logs):

* ``checkpoints/last.ckpt`` — trainable parameters + optimizer state, written every
  ``align.checkpoint_every_n_steps`` steps and at each epoch end; a rerun of the same config
  resumes from it (a different config never does: ``checkpoints/fingerprint`` must match);
* ``model/`` — written atomically at the end: the adapter (``save_pretrained``), the tokenizer
  with the location tokens, the code table (``codes.parquet``, ``index.json``) and
  ``qtmob.json`` (base model, chat layout). Plain transformers + peft reload it (README);
* ``align.json`` — fingerprint, losses, steps, seconds, throughput, peak memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml

from datamodules.artifacts import (
    atomic_dir,
    file_manifest,
    reusable,
    write_json_atomic,
    write_text_atomic,
)
from datamodules.errors import DataError
from datamodules.mobility_datamodule import MobilityDataModule
from datamodules.prompts import SYSTEM_PROMPT
from lightning_modules.aligned_model import greedy_generate, save_aligned
from lightning_modules.alignment_module import AlignmentModule, peak_rss_mb
from lightning_modules.chat_encoding import ChatEncoder
from lightning_modules.dashboards import flat_hparams, log_run
from lightning_modules.llm import build_peft_model
from lightning_modules.ranking import rank_prompts
from lightning_modules.results import score
from location_tokenizers.codes import CodeTable, all_code_tokens, level_token
from location_tokenizers.trie import CodeTrie
from pipeline.config import RunConfig, as_dict, load_config
from pipeline.paths import (
    RENDER_KEYS,
    align_fingerprint,
    data_dir,
    load_codes,
    render_settings,
    run_dir,
    run_precision,
)
from pipeline.trainers import (
    align_schedule,
    fitted_progress,
    is_whole,
    make_logger,
    make_trainer,
    world_size,
)

log = logging.getLogger(__name__)

ALIGN_FILES = ("model/adapter_config.json", "model/tokenizer_config.json", "model/codes.parquet", "model/qtmob.json")


def next_location_evaluator(cfg: RunConfig, dm: Any, encoder: Any, tokenizer: Any, model: Any, table: CodeTable):
    """``val/acc@1`` (with 5 beams or more also acc@5 and ndcg@5) of next-location prediction with constrained
    beam search on a fixed set of ``eval.val_cases`` validation samples, and ``val/cases``, how many it scored
    (a handful of cases cannot tell two runs apart); None when there are none."""

    n = cfg.eval.val_cases
    if n <= 0 or "next" not in cfg.objectives.tasks:
        return None
    valid = dm.samples("valid").filter((pl.col("task") == "next") & pl.col("target_loc").is_not_null()).head(n)
    if valid.is_empty():
        return None
    if valid.height < n:  # say so, or a larger eval.val_cases silently decodes the same few cases
        cap = cfg.align.eval_per_task
        log.warning("eval.val_cases=%d, but the validation set holds %d next-location samples%s: val/acc@1 scores those %d",
                    n, valid.height, f" (align.eval_per_task={cap} caps it; raise it to decode more)"
                    if cap is not None and cap < n else "", valid.height)
    prompts = encoder.prompt_texts(valid)
    target = valid["target_loc"].to_numpy()
    trie = CodeTrie(table, tokenizer, vocab_size=int(model.config.vocab_size))
    beams = cfg.eval.val_beams

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        was_training = m.training
        m.eval()
        try:
            locs, _ = rank_prompts(m, encoder, trie.to(next(m.parameters()).device), prompts, beams, int(cfg.eval.batch_size),
                                   precision=run_precision(cfg), share_prefix=bool(cfg.eval.share_prefix),
                                   code_softmax=cfg.align.code_softmax)
        finally:
            m.train(was_training)
        metrics = score(locs, target, beams)
        keep = ("acc@1", "acc@5", "ndcg@5") if beams >= 5 else ("acc@1",)
        return {**{k: metrics[k] for k in keep}, "cases": float(len(target))}

    return evaluate


def command_line(cfg: RunConfig) -> str:
    """The command that reproduces this run (Hydra's overrides; else the run name)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return " ".join(["python run.py", *HydraConfig.get().overrides.task])
    return f"python run.py run_name={cfg.run_name}"


def example_prompt(dm: Any, encoder: Any) -> dict[str, Any] | None:
    """One validation prompt as the model reads it (chat layout, response prefix included): the README's
    prediction example and a reference for the prompt format."""
    valid = dm.samples("valid")
    picked = valid.filter((pl.col("task") == "next") & pl.col("target_loc").is_not_null()).head(1)
    if picked.is_empty():
        return None
    return {"task": "next", "prompt": encoder.prompt_texts(picked)[0], "target": picked["target"][0],
            "target_loc": int(picked["target_loc"][0])}


def build_alignment(cfg: RunConfig | Any, table: CodeTable | None = None) -> dict[str, Any]:
    """Model, tokenizer, encoder, data module and LightningModule of the configured alignment run.

    Shared by the stage, the tests and the benchmarks, so that they exercise the same objects.
    """

    cfg = load_config(cfg)
    a = cfg.align
    table = load_codes(cfg) if table is None else table
    tokens = all_code_tokens(table.num_levels, table.codebook_size)
    model, tokenizer, info = build_peft_model(cfg.llm, a, cfg.paths.cache, tokens, seed=int(cfg.seed))
    encoder = ChatEncoder(tokenizer, SYSTEM_PROMPT, max_length=int(a.max_length), prompt_format=a.prompt_format,
                          code_token_ids=tokenizer.convert_tokens_to_ids(tokens),
                          next_end=cfg.data.samples.next_format != "trajectory")
    weights = cfg.objectives.weights
    dm = MobilityDataModule(
        data_dir(cfg), codes=table.strings(), tasks=list(cfg.objectives.tasks),
        weights=dict(weights) if weights else None, batch_size=a.batch_size,
        num_workers=a.num_workers, sample_cfg=cfg.data.samples, seed=cfg.seed,
        encoder=encoder, eval_per_task=a.eval_per_task, group_batches=a.group_batches,
    )
    n_gen = a.num_generations
    prompts: list[tuple[str, str]] = []
    if n_gen:
        valid = dm.samples("valid")
        picked = valid.filter(pl.col("task") == "next").head(n_gen) if "next" in valid["task"] else valid.head(n_gen)
        prompts = list(zip(encoder.prompt_texts(picked), picked["target"].to_list()))
    module = AlignmentModule(
        model, tasks=list(cfg.objectives.tasks), lr=float(a.lr), lora_plus_ratio=float(a.lora_plus_ratio),
        weight_decay=float(a.weight_decay),
        warmup_ratio=float(a.warmup_ratio), min_lr_ratio=a.min_lr_ratio,
        generation_prompts=prompts, generation_fn=lambda m, p: greedy_generate(m, encoder, p),
        evaluator=next_location_evaluator(cfg, dm, encoder, tokenizer, model, table),
        loss_reduction=a.loss_reduction, batch_size=a.batch_size, evaluate_every=cfg.eval.val_every,
        first_code_weight=float(a.first_code_weight),
        first_code_ids=tokenizer.convert_tokens_to_ids([level_token(0, c) for c in range(table.codebook_size)]),
        code_softmax=a.code_softmax, hint_smoothing=float(a.hint_smoothing),
        hint_smoothing_decay=float(a.hint_smoothing_decay),
        code_token_ids=[tokenizer.convert_tokens_to_ids([level_token(lv, c) for c in range(table.codebook_size)])
                        for lv in range(table.num_levels)],
    )
    return {"model": model, "tokenizer": tokenizer, "info": info, "encoder": encoder, "datamodule": dm,
            "module": module, "table": table}


def _checkpoint_callback(cfg: RunConfig, out: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.align.checkpoint_every_n_steps or None, save_on_train_epoch_end=True)


def _resume_point(out: Path, fp: str, force: bool) -> str | None:
    """The checkpoint to resume from, or None to start afresh; stops with one line rather than lose work.

    * A finished model or a resumable checkpoint of *another* configuration in this run folder is never
      replaced silently: the run stops and says how to keep it (another ``run_name``) or replace it
      (``force=true``).
    * A ``last.ckpt`` that does not load (cut by a crash or a full disk) is moved aside, said in the log,
      and training starts from scratch.
    """
    ckpt_dir = out / "checkpoints"
    last, stamp = ckpt_dir / "last.ckpt", ckpt_dir / "fingerprint"
    if force:
        return None
    finished = out / "align.json"
    if finished.is_file():
        try:
            other = json.loads(finished.read_text()).get("fingerprint")
        except (ValueError, OSError):
            other = None
        if other is not None and other != fp:
            raise DataError(f"{out} holds a model aligned with another configuration ({other}); keep it with another "
                            "run_name=..., or replace it with force=true")
    if not last.is_file():
        return None
    if not stamp.is_file() or stamp.read_text().strip() != fp:
        raise DataError(f"{last} is a resumable checkpoint of another configuration; rerun that configuration to resume it, "
                        "use another run_name=..., or discard it with force=true")
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is handled the same way
        aside = out / f"unreadable-last-{int(time.time())}.ckpt"  # beside checkpoints/, which the fresh run clears
        os.replace(last, aside)
        log.warning("align: %s does not load (%s: %s); moved to %s, training starts from scratch", last,
                    type(exc).__name__, str(exc).splitlines()[0][:120] if str(exc) else "", aside.name)
        return None
    log.info("align: resuming from %s", last)
    return str(last)


def run_align_stage(cfg: RunConfig, force: bool | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) the alignment stage."""
    import lightning as L

    cfg = load_config(cfg)
    force = cfg.force if force is None else force
    out = run_dir(cfg)
    fp = align_fingerprint(cfg)
    if (old := reusable(out, "align.json", ALIGN_FILES, fp, force, "align")) is not None:
        return old
    ckpt_dir = out / "checkpoints"
    resume = _resume_point(out, fp, force)
    if resume is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a forced run's own restart, or nothing worth keeping (see _resume_point)
    stamp = ckpt_dir / "fingerprint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, fp + "\n")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(as_dict(cfg), sort_keys=False))

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t0 = time.perf_counter()
    parts = build_alignment(cfg)
    dm, module = parts["datamodule"], parts["module"]
    # Render and tokenise the samples here, before fit: forked DDP processes (strategy=ddp_fork) cannot
    # use Polars' thread pool, which does not survive a fork; they reuse these tables instead.
    for split in ("train", "valid"):
        dm.encoded(split)
    train_samples = cfg.align.train_samples  # in total, over all processes
    per_rank = int(train_samples) // (int(cfg.align.batch_size) * world_size(cfg)) if train_samples else 0
    overrides: dict[str, Any] = {}
    # Batches per epoch: align.train_samples, or fewer where the run asks (debug=limit, debug=overfit).
    asked = [v for k in ("limit_train_batches", "overfit_batches") if is_whole(v := cfg.trainer.get(k)) and v > 0]
    limits = ([max(per_rank, 1)] if train_samples else []) + asked
    if train_samples:
        overrides["limit_train_batches"] = min(limits)
    vci = cfg.trainer.get("val_check_interval", 1.0)
    if limits and is_whole(vci) and vci > min(limits):
        overrides["val_check_interval"] = min(limits)  # a validation every N steps, at most once an epoch
    trainer = make_trainer(
        cfg, "align", logger=make_logger(cfg, "align"), callbacks=[_checkpoint_callback(cfg, out)],
        # The data module shards its length-grouped batches by rank itself.
        use_distributed_sampler=False, precision=run_precision(cfg), num_sanity_val_steps=0, deterministic=False,
        **{**align_schedule(cfg), **overrides},
    )
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    if trainer.interrupted:  # Ctrl-C: Lightning returns normally; an unfinished model must not look final
        raise KeyboardInterrupt(f"alignment interrupted at step {trainer.global_step}; rerun the same command to resume from {ckpt_dir / 'last.ckpt'}")
    seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    steps, epochs = fitted_progress(trainer, ckpt_dir / "last.ckpt")
    result = {
        "fingerprint": fp, "run_dir": str(out), "model_dir": str(out / "model"), "llm": str(cfg.llm.name),
        "steps": steps, "epochs": epochs, "seconds": round(seconds, 1), "processes": world_size(cfg),
        "resumed_from": resume, "metrics": metrics, "peak_rss_mb": round(peak_rss_mb(), 1),
        # The length rule: samples whose oldest visits were cut (per split and task), and those still cut
        # by tokens as a last resort (no visits to drop).
        "cut_history": dm.cut_history, "truncated_by_tokens": {s: dm.encoded(s).truncated_by_task or {} for s in ("train", "valid")},
        "truncated_samples": int(dm.encoded("train").truncated), "train_samples": len(dm.encoded("train")),
        "train_tokens": int(dm.encoded("train").offsets[-1]),  # of all train samples (those drawn are a subset)
        **{k: v for k, v in parts["info"].items() if k != "new_token_ids"},
    }
    if trainer.global_rank == 0:
        log_run(trainer.logger, flat_hparams(as_dict(cfg)),
                {k: v for k, v in metrics.items() if k.startswith("align/val/")}, step=steps)
        a = cfg.align
        extra = {
            "llm": str(cfg.llm.name), "dataset": str(cfg.data.name), "tokenizer": str(cfg.tokenizer.name),
            "command": command_line(cfg), "example": example_prompt(dm, parts["encoder"]),
            # How samples were written (every rendering switch, pipeline.paths.RENDER_KEYS, and the next-location
            # format): prompts at use must be written alike.
            **{k: getattr(cfg.data.samples, k) for k in ("next_format", *RENDER_KEYS)},
            "training": {"tasks": list(cfg.objectives.tasks), "weights": dict(cfg.objectives.weights)
                         if cfg.objectives.weights else None, "steps": steps, "batch_size": int(a.batch_size),
                         "lr": float(a.lr), "lora_r": int(a.lora.r), "lora_alpha": int(a.lora.alpha),
                         "lora_targets": list(a.lora.target_modules), "lora_layers": int(a.lora_layers),
                         "max_length": int(a.max_length),
                         "first_code_weight": float(a.first_code_weight), "code_softmax": str(a.code_softmax),
                         "hint_smoothing": float(a.hint_smoothing), "hint_smoothing_decay": float(a.hint_smoothing_decay),
                         "precision": run_precision(cfg),
                         # Which answer tokens whole-trajectory samples with hints labelled (null where the question
                         # did not arise); recorded since session 38, so stage=predict can tell a model of the fixed
                         # labels from one aligned before the session-37 fix without its run's fingerprint.
                         "hint_labels": render_settings(cfg).get("hint_labels")},
        }
        with atomic_dir(out / "model") as tmp:
            save_aligned(tmp, parts["model"], parts["tokenizer"], parts["table"], parts["info"], parts["encoder"], extra)
        result["manifest"] = file_manifest(out, ["model"], skip=["model/README.md"])
        write_json_atomic(out / "align.json", result)
    log.info("align: %d steps in %.0f s, train loss %.3f, samples with history cut to max_length %s -> %s", result["steps"],
             seconds, metrics.get("align/train/loss", float("nan")), result["cut_history"], out)
    return result


__all__ = ["build_alignment", "run_align_stage"]
