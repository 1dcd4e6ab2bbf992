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
from omegaconf import DictConfig, OmegaConf

from datamodules.artifacts import atomic_dir, file_manifest, fingerprint, reusable, run_dir, tb_dir, write_json_atomic
from datamodules.data_stage import data_dir, data_fingerprint
from datamodules.dataset import sample_config
from datamodules.errors import DataError
from datamodules.samples import SYSTEM_PROMPT
from lightning_modules.alignment_module import peak_rss_mb
from lightning_modules.dashboards import flat_hparams, log_run
from lightning_modules.hardware import resolve_precision
from lightning_modules.llm import align_compute_dtype, align_quantization
from location_tokenizers.codes import CodeTable, all_code_tokens
from location_tokenizers.tokenizer_stage import load_codes, run_tokenizer_stage, tokenizer_fingerprint

log = logging.getLogger(__name__)

ALIGN_FILES = ("model/adapter_config.json", "model/tokenizer_config.json", "model/codes.parquet", "model/qtmob.json")


def align_fingerprint(cfg: DictConfig) -> str:
    """Everything that determines the aligned model."""
    part = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    trainer = {k: cfg.trainer.get(k) for k in ("max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val")}
    trainer["precision"] = run_precision(cfg)  # resolved: `auto` means another thing on another machine
    return fingerprint({
        "data": data_fingerprint(cfg), "tokenizer": tokenizer_fingerprint(cfg), "llm": part(cfg.llm),
        "align": {**{k: v for k, v in part(cfg.align).items() if k not in ("num_workers", "num_generations")},
                  "compute_dtype": align_compute_dtype(cfg.align), "quantization": align_quantization(cfg.align)},
        "objectives": part(cfg.objectives), "trainer": trainer, "seed": int(cfg.seed),
    })


def run_precision(cfg: DictConfig) -> str:
    """The Lightning precision this run computes in (``trainer.precision=auto`` resolved for this machine)."""
    return resolve_precision(cfg.trainer.precision, str(cfg.trainer.accelerator))


def greedy_generate(model: torch.nn.Module, encoder: Any, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Unconstrained greedy continuations of chat-formatted prompts (for the TensorBoard samples)."""
    was_training = model.training
    model.eval()
    try:
        batch = encoder.prompt_batch(prompts, device=next(model.parameters()).device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=encoder.pad_id,
                eos_token_id=encoder.tokenizer.convert_tokens_to_ids(encoder.end) if encoder.end else None,
            )
        new = out[:, batch["input_ids"].shape[1] :]
        return [encoder.tokenizer.decode(row, skip_special_tokens=False).replace(encoder.tokenizer.pad_token, "") for row in new]
    finally:
        model.train(was_training)


def next_location_evaluator(cfg: DictConfig, dm: Any, encoder: Any, tokenizer: Any, model: Any, table: CodeTable):
    """``val/acc@1`` (and acc@5) of next-location prediction with constrained beam search on a fixed
    set of ``eval.val_cases`` validation samples; None when there are none."""
    from lightning_modules.evaluation import rank_prompts, score
    from location_tokenizers.trie import CodeTrie

    n = int(cfg.eval.get("val_cases", 0) or 0)
    if n <= 0 or "next" not in cfg.objectives.tasks:
        return None
    valid = dm.samples("valid").filter((pl.col("task") == "next") & pl.col("target_loc").is_not_null()).head(n)
    if valid.is_empty():
        return None
    prompts = encoder.prompt_texts(valid)
    target = valid["target_loc"].to_numpy()
    trie = CodeTrie(table, tokenizer, vocab_size=int(model.config.vocab_size))
    beams = int(cfg.eval.get("val_beams", 5))

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        was_training = m.training
        m.eval()
        try:
            locs, _ = rank_prompts(m, encoder, trie.to(next(m.parameters()).device), prompts, beams, int(cfg.eval.batch_size),
                                   precision=run_precision(cfg))
        finally:
            m.train(was_training)
        metrics = score(locs, target, beams)
        return {"acc@1": metrics["acc@1"], "acc@5": metrics["acc@5"]} if beams >= 5 else {"acc@1": metrics["acc@1"]}

    return evaluate


def save_aligned(folder: Path, model: Any, tokenizer: Any, table: CodeTable, info: dict[str, Any], encoder: Any,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adapter + tokenizer + code table + ``qtmob.json`` + model card in one folder; returns the
    ``qtmob.json`` content.

    Made to be sent: ``adapter_config.json`` names the base by its Hub id (not this machine's cache
    folder); with ``align.new_tokens=rows`` only the trained rows of the new tokens are saved (peft's
    ``trainable_tokens_delta``), not the whole resized embedding matrix that peft saves by default
    after a vocabulary resize (236 MB instead of ~8 MB for SmolLM2). ``frozen`` keeps peft's default:
    its new rows are the seeded initial ones, which a reload could not rebuild otherwise.
    """
    from lightning_modules.model_card import write_model_card

    peft_cfg = model.peft_config[model.active_adapter]
    local = peft_cfg.base_model_name_or_path
    if info.get("base_model_hub"):
        peft_cfg.base_model_name_or_path = info["base_model_hub"]
    try:
        model.save_pretrained(folder, save_embedding_layers="auto" if info.get("new_tokens_mode") == "frozen" else False)
    finally:
        peft_cfg.base_model_name_or_path = local
    tokenizer.save_pretrained(folder)
    table.write_parquet(folder / "codes.parquet")
    table.to_index_json(folder / "index.json")
    meta = {
        **{k: v for k, v in info.items() if k not in ("new_token_ids", "base_model")},
        # The Hub id where there is one; a random test model has only its local folder.
        "base_model": info.get("base_model_hub") or info.get("base_model"),
        "vocab_size": len(tokenizer),
        "code_levels": table.num_levels, "codebook_size": table.codebook_size, "locations": len(table),
        "system_prompt": encoder.system_prompt,
        "prompt_format": encoder.prompt_format,
        "chat": {"head": encoder.head, "tail": encoder.tail, "end": encoder.end},
        **(extra or {}),
    }
    (folder / "qtmob.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card(folder, meta)
    return meta


def load_aligned(folder: str | Path, base_model: str | None = None, **kwargs: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Reload an aligned model with plain transformers + peft: base → resize → adapter.

    Args:
        folder: The stage's ``model/`` folder.
        base_model: Base model folder or Hub id (default: the one recorded in ``qtmob.json``, a Hub id
            for hub and packaged models). The suite passes its local copy, so nothing is downloaded.
        **kwargs: Passed to the base model's ``from_pretrained`` (``dtype``, ``quantization_config``).
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / "qtmob.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(base_model or meta["base_model"], **kwargs)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(base, folder), tokenizer, meta


def base_model_path(cfg: DictConfig) -> str | None:
    """This machine's copy of the configured base model (converted once into the cache; None for the
    random test model, whose folder ``qtmob.json`` records)."""
    from lightning_modules.llm import model_path

    return None if str(cfg.llm.source) == "random" else model_path(cfg.llm, cfg.paths.cache)


def command_line(cfg: DictConfig) -> str:
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


def build_alignment(cfg: DictConfig, table: CodeTable | None = None) -> dict[str, Any]:
    """Model, tokenizer, encoder, data module and LightningModule of the configured alignment run.

    Shared by the stage, the tests and the benchmarks, so that they exercise the same objects.
    """
    from datamodules.mobility_datamodule import MobilityDataModule
    from lightning_modules.alignment_module import AlignmentModule
    from lightning_modules.chat_encoding import ChatEncoder
    from lightning_modules.llm import build_peft_model

    a = cfg.align
    table = load_codes(cfg) if table is None else table
    tokens = all_code_tokens(table.num_levels, table.codebook_size)
    model, tokenizer, info = build_peft_model(cfg.llm, a, cfg.paths.cache, tokens, seed=int(cfg.seed))
    encoder = ChatEncoder(tokenizer, SYSTEM_PROMPT, max_length=int(a.max_length), prompt_format=str(a.get("prompt_format", "chat")),
                          code_token_ids=tokenizer.convert_tokens_to_ids(tokens))
    weights = cfg.objectives.get("weights")
    dm = MobilityDataModule(
        data_dir(cfg), codes=table.strings(), tasks=list(cfg.objectives.tasks),
        weights=OmegaConf.to_container(weights) if weights else None, batch_size=int(a.batch_size),
        num_workers=int(a.get("num_workers", 0)), sample_cfg=sample_config(cfg.data), seed=int(cfg.seed),
        encoder=encoder, eval_per_task=a.get("eval_per_task"), group_batches=int(a.get("group_batches", 64)),
    )
    n_gen = int(a.get("num_generations", 0))
    prompts: list[tuple[str, str]] = []
    if n_gen:
        valid = dm.samples("valid")
        picked = valid.filter(pl.col("task") == "next").head(n_gen) if "next" in valid["task"] else valid.head(n_gen)
        prompts = list(zip(encoder.prompt_texts(picked), picked["target"].to_list()))
    module = AlignmentModule(
        model, tasks=list(cfg.objectives.tasks), lr=float(a.lr), weight_decay=float(a.weight_decay),
        warmup_ratio=float(a.warmup_ratio), min_lr_ratio=float(a.get("min_lr_ratio", 0.0)),
        generation_prompts=prompts, generation_fn=lambda m, p: greedy_generate(m, encoder, p),
        evaluator=next_location_evaluator(cfg, dm, encoder, tokenizer, model, table),
        loss_reduction=str(a.get("loss_reduction", "sample")), batch_size=int(a.batch_size),
        evaluate_every=int(cfg.eval.get("val_every", 1) or 1),
    )
    return {"model": model, "tokenizer": tokenizer, "info": info, "encoder": encoder, "datamodule": dm,
            "module": module, "table": table}


def world_size(cfg: DictConfig) -> int:
    """Training processes of the configured trainer (devices x nodes; 1 for devices=auto)."""
    devices = cfg.trainer.devices
    n = int(devices) if isinstance(devices, int) or str(devices).isdigit() else len(devices) if OmegaConf.is_list(devices) else 1
    return max(n, 1) * int(cfg.trainer.get("num_nodes", 1))


def fitted_progress(trainer: Any, last_ckpt: Path) -> tuple[int, int]:
    """``(global_step, epochs)`` of a finished fit. A forked/spawned DDP run trains in child processes
    and hands back only weights and metrics, so its counters are read from its last checkpoint."""
    if trainer.global_step == 0 and last_ckpt.is_file():
        ckpt = torch.load(last_ckpt, map_location="cpu", weights_only=True)
        return int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)) + 1
    return int(trainer.global_step), int(trainer.current_epoch)


def make_trainer(cfg: DictConfig, out: Path, **overrides: Any):
    """The Lightning Trainer of the alignment stage (TensorBoard, progress lines, resumable last.ckpt)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_modules.dashboards import tensorboard_logger
    from lightning_modules.distributed import ForkSafeThreads
    from lightning_modules.progress import ProgressStyle

    t = cfg.trainer
    logger = tensorboard_logger(tb_dir(cfg), "align")
    progress = ProgressStyle.from_mapping(cfg.get("progress")).trainer_kwargs("align")
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, save_top_k=0,
        every_n_train_steps=int(cfg.align.get("checkpoint_every_n_steps", 50)) or None, save_on_train_epoch_end=True,
    )
    kwargs: dict[str, Any] = dict(
        accelerator=str(t.accelerator), devices=t.devices, strategy=t.get("strategy", "auto"), num_nodes=int(t.get("num_nodes", 1)),
        # The data module shards its length-grouped batches by rank itself.
        use_distributed_sampler=False, precision=run_precision(cfg), max_epochs=int(t.max_epochs),
        max_steps=int(t.max_steps), accumulate_grad_batches=int(t.accumulate_grad_batches),
        gradient_clip_val=t.gradient_clip_val, log_every_n_steps=int(t.log_every_n_steps),
        val_check_interval=t.val_check_interval, logger=logger,
        callbacks=[checkpoint, ForkSafeThreads(), *progress.pop("callbacks")], **progress,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=False,
        limit_val_batches=t.get("limit_val_batches", 1.0),
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


ALIGN_CHOICES = {
    "quantization": ("auto", "nf4", "int8", "none"), "new_tokens": ("modules", "rows", "frozen"),
    "new_token_init": ("mean", "vocab"), "loss_reduction": ("sample", "token"), "prompt_format": ("chat", "inst"),
}
ALIGN_NUMBERS = {"lr": float, "weight_decay": float, "warmup_ratio": float, "batch_size": int, "max_length": int,
                 "checkpoint_every_n_steps": int}


def validate_align(cfg: DictConfig) -> None:
    """One line per bad ``align`` setting, before any run folder is touched (a typo must never cost a
    resumable checkpoint)."""
    a = cfg.align
    for key, allowed in ALIGN_CHOICES.items():
        if key in a and str(a[key]) not in allowed:
            raise DataError(f"align.{key}={a[key]!r} is not one of {list(allowed)}")
    for key, kind in ALIGN_NUMBERS.items():
        if key not in a:
            continue
        try:
            value = kind(a[key])
        except (TypeError, ValueError):
            raise DataError(f"align.{key}={a[key]!r} is not a {'number' if kind is float else 'whole number'}") from None
        if value < 0 or (key in ("lr", "batch_size", "max_length") and value == 0):
            raise DataError(f"align.{key}={a[key]!r} must be {'positive' if key in ('lr', 'batch_size', 'max_length') else '>= 0'}")


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


def run_align_stage(cfg: DictConfig, force: bool | None = None) -> dict[str, Any]:
    """Run (or skip, or resume) the alignment stage."""
    import lightning as L

    force = bool(cfg.get("force", False)) if force is None else force
    run_tokenizer_stage(cfg, force=False)  # it runs (or reuses) the data stage first
    out = run_dir(cfg)
    fp = align_fingerprint(cfg)
    if (old := reusable(out, "align.json", ALIGN_FILES, fp, force, "align")) is not None:
        return old
    validate_align(cfg)  # before anything in the run folder is touched
    ckpt_dir = out / "checkpoints"
    resume = _resume_point(out, fp, force)
    if resume is None and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # a forced run's own restart, or nothing worth keeping (see _resume_point)
    stamp = ckpt_dir / "fingerprint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fp + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    t0 = time.perf_counter()
    parts = build_alignment(cfg)
    dm, module = parts["datamodule"], parts["module"]
    # Render and tokenise the samples here, before fit: forked DDP processes (strategy=ddp_fork) cannot
    # use Polars' thread pool, which does not survive a fork; they reuse these tables instead.
    for split in ("train", "valid"):
        dm.encoded(split)
    train_samples = cfg.align.get("train_samples")  # in total, over all processes
    per_rank = int(train_samples) // (int(cfg.align.batch_size) * world_size(cfg)) if train_samples else 0
    overrides: dict[str, Any] = {}
    if train_samples:
        overrides["limit_train_batches"] = max(per_rank, 1)
        vci = cfg.trainer.val_check_interval
        if isinstance(vci, int) and not isinstance(vci, bool) and vci > overrides["limit_train_batches"]:
            overrides["val_check_interval"] = overrides["limit_train_batches"]  # a validation every N steps, at most once an epoch
    trainer = make_trainer(cfg, out, **overrides)
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
        log_run(trainer.logger, flat_hparams(OmegaConf.to_container(cfg, resolve=True)),
                {k: v for k, v in metrics.items() if k.startswith("align/val/")}, step=steps)
        a = cfg.align
        extra = {
            "llm": str(cfg.llm.name), "dataset": str(cfg.data.name), "tokenizer": str(cfg.tokenizer.name),
            "command": command_line(cfg), "example": example_prompt(dm, parts["encoder"]),
            # How visits were written (data.samples.visit_text): prompts at use must be written alike.
            **{k: getattr(sample_config(cfg.data), k) for k in ("visit_text", "next_format")},
            "training": {"tasks": list(cfg.objectives.tasks), "weights": OmegaConf.to_container(cfg.objectives.weights)
                         if cfg.objectives.get("weights") else None, "steps": steps, "batch_size": int(a.batch_size),
                         "lr": float(a.lr), "lora_r": int(a.lora.r), "lora_alpha": int(a.lora.alpha),
                         "lora_targets": list(a.lora.target_modules), "max_length": int(a.max_length),
                         "precision": run_precision(cfg)},
        }
        with atomic_dir(out / "model") as tmp:
            save_aligned(tmp, parts["model"], parts["tokenizer"], parts["table"], parts["info"], parts["encoder"], extra)
        result["manifest"] = file_manifest(out, ["model"], skip=["model/README.md"])
        write_json_atomic(out / "align.json", result)
    log.info("align: %d steps in %.0f s, train loss %.3f, samples with history cut to max_length %s -> %s", result["steps"],
             seconds, metrics.get("align/train/loss", float("nan")), result["cut_history"], out)
    return result


__all__ = ["align_fingerprint", "build_alignment", "load_aligned", "make_trainer", "run_align_stage", "run_dir", "save_aligned"]
