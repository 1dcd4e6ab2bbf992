"""``AlignmentModule``: (Q)LoRA fine-tuning that teaches an LLM the location tokens.

One ``model_step`` serves training and validation: the decoder runs once, the LM head is applied
only at answer positions (labels ≠ −100: a next-location answer is ~10 of ~400 tokens, so this
skips almost all of the vocabulary-sized matmul), and the cross-entropy is split per sample so
that per-task losses come for free.

``loss_reduction`` decides what one sample weighs. ``sample`` (the paper's: the official code trains
one sample per device with gradient accumulation) averages each sample's answer tokens, then the
samples: a 5-token next-location answer counts as much as a 534-token description. A whole-trajectory
sample (``data.samples.next_format=trajectory``) counts as many answers as it trains visits, each
its code's token mean: the loss of all prefixes of a trajectory in one forward pass. ``token``
averages all answer tokens of a batch, so long answers dominate (with the paper mixture,
next-location is 44 % of the samples but ~12 % of a token-mean loss). In ``sample`` mode the batch
sum is divided by the *nominal* batch size, so a short last batch, gradient accumulation (Lightning
divides by the accumulation steps) and DDP (gradients are averaged over ranks) all give every sample
the same weight.

Logged under ``align/`` (so that the RQ-VAE's and the GRU's curves never share a tag):

* ``align/train/loss`` and per objective ``align/train/loss_next``, ``…/loss_recovery`` (multi and
  single), ``…/loss_index2loc``, ``…/loss_loc2index``, ``…/loss_translation``, and the same under
  ``align/val/``. Train and validation losses are computed the same way: the answer-token mean over
  a window (train: the steps since the last log point; validation: the validation subset), so a
  train and a validation curve can be laid on each other;
* ``align/lr``, ``align/grad_norm`` (before clipping), ``align/tokens_per_s``, ``align/padding_share``,
  ``align/peak_rss_mb`` (and ``align/peak_cuda_mb`` on a GPU);
* ``align/val/acc@1`` (and acc@5, ndcg@5 and ``cases``, how many it scored) of next-location prediction
  with constrained decoding, when an evaluator is given, and a few sample generations as TensorBoard text.

Checkpoints hold the trainable parameters only (LoRA, new token rows): a resumable ``last.ckpt``
is megabytes, not the quantised base model.
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_modules.constrained_decoding import CODE_SOFTMAXES

# Objective under which each task's loss is logged (the two recovery tasks form one objective).
OBJECTIVE = {
    "next": "next",
    "recovery_multi": "recovery",
    "recovery_single": "recovery",
    "index2loc": "index2loc",
    "loc2index": "loc2index",
    "translation": "translation",
}


LOSS_REDUCTIONS = ("sample", "token")


class CodeLevels:
    """Which level of the location codes a token id belongs to, and its place in that level's codebook.

    ``code_softmax=level`` scores a labelled code token against the other tokens of its level only: the
    decision constrained decoding makes (it never writes anything but a code token there), so that no
    training signal is spent on pushing the ~49k ordinary tokens below the code tokens.
    """

    def __init__(self, code_token_ids: Sequence[Sequence[int]]) -> None:
        ids = torch.as_tensor([list(row) for row in code_token_ids], dtype=torch.long)  # (L, K), -1: none
        if ids.dim() != 2 or not bool((ids >= 0).any()):
            raise ValueError("code_token_ids must be a (levels, codebook_size) table of token ids")
        size = int(ids.max()) + 1
        self.ids = ids
        self.level = torch.full((size,), -1, dtype=torch.long)
        self.index = torch.zeros(size, dtype=torch.long)
        levels, codes = (ids >= 0).nonzero(as_tuple=True)
        self.level[ids[levels, codes]] = levels
        self.index[ids[levels, codes]] = codes

    def of(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(level, index)`` of each target id; level ``-1`` for a token that is not a code token."""
        level = torch.full_like(targets, -1)
        index = torch.zeros_like(targets)
        inside = (targets >= 0) & (targets < self.level.numel())
        level[inside] = self.level.to(targets.device)[targets[inside]]
        index[inside] = self.index.to(targets.device)[targets[inside]]
        return level, index

    def cross_entropy(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-target cross-entropy: over the target's code level for code tokens, the vocabulary otherwise."""
        full = F.cross_entropy(logits, targets, reduction="none")
        level, index = self.of(targets)
        code = level >= 0
        if not bool(code.any()):
            return full
        ids = self.ids.to(logits.device)[level.clamp(min=0)]  # (N, K)
        sub = logits.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
        return torch.where(code, F.cross_entropy(sub, index, reduction="none"), full)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class AlignmentModule(L.LightningModule):
    """Mixed-objective alignment of a (quantised) LLM with LoRA adapters.

    Args:
        model: A peft model (see :func:`lightning_modules.llm.build_peft_model`).
        tasks: The tasks being trained (their objectives get loss metrics).
        lr: Peak learning rate (AdamW).
        lora_plus_ratio: The LoRA B matrices' learning rate as a multiple of ``lr`` (LoRA+; 1: plain LoRA).
        loss_reduction: ``sample`` (mean per sample, then over samples) or ``token`` (mean over all
            answer tokens of the batch).
        batch_size: Nominal samples per batch (the ``sample`` divisor).
        weight_decay: AdamW weight decay.
        warmup_ratio: Share of the steps with linear warm-up; then cosine decay to ``min_lr_ratio``.
        min_lr_ratio: Final learning rate as a share of ``lr``.
        generation_prompts: ``(prompt_text, expected)`` pairs generated greedily at the end of each
            validation and logged as text.
        generation_fn: ``(model, prompt_texts) -> list[str]``: how to generate those samples.
        evaluator: ``(model) -> {metric: value}`` run at the end of each validation (e.g.
            next-location Acc@1 with constrained decoding on a fixed subset); logged under ``align/val/``.
        evaluate_every: Run the evaluator and the generations at every this many validations (and
            at the last): decoding costs far more than the validation losses.
        first_code_weight: The training loss's weight on each labelled token in ``first_code_ids`` against 1
            for the other labelled tokens, rescaled so that the batch's total weight stays the same
            (validation losses are never weighted). 1: the plain per-answer mean.
        first_code_ids: Token ids of the first level of the location codes.
        code_softmax: ``vocab`` (the paper): every labelled token's cross-entropy over the whole vocabulary;
            ``level``: a labelled location-code token's over its own level's code tokens only (the choice
            that constrained decoding with ``code_softmax=level`` scores), other tokens over the vocabulary.
        code_token_ids: ``(levels, codebook_size)`` token ids of the location codes (``-1``: none), for
            ``code_softmax=level``.
        hint_smoothing: λ ≥ 0: in training, a trained visit's first code token also gets λ times the mean
            cross-entropy of its visit's hinted places' first tokens (the batch's ``hint_ids``; softmax as
            ``code_softmax``): the target is the one-hot label plus λ spread over the hinted places (evenly at
            ``hint_smoothing_decay`` 1, where their order among themselves stays the labels': a constant added to
            each), so the first tokens of the hints are pushed above the others. Validation losses and the logged
            means stay plain. 0: off.
        hint_smoothing_decay: d in (0, 1]: the k-th hinted place (0-based, in the prompt's order, best first) weighs
            d^k in that mean instead of 1 (1: even), so λ leans towards the hint's first place.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tasks: Sequence[str],
        lr: float = 2e-4,
        lora_plus_ratio: float = 1.0,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        generation_prompts: Sequence[tuple[str, str]] = (),
        generation_fn: Callable[[torch.nn.Module, list[str]], list[str]] | None = None,
        evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        loss_reduction: str = "sample",
        batch_size: int = 8,
        evaluate_every: int = 1,
        first_code_weight: float = 1.0,
        first_code_ids: Sequence[int] = (),
        code_softmax: str = "vocab",
        code_token_ids: Sequence[Sequence[int]] = (),
        hint_smoothing: float = 0.0,
        hint_smoothing_decay: float = 1.0,
    ) -> None:
        super().__init__()
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"align.loss_reduction={loss_reduction!r}; choose from {list(LOSS_REDUCTIONS)}")
        if first_code_weight != 1.0 and not len(first_code_ids):
            raise ValueError("align.first_code_weight needs the ids of the codes' first tokens (first_code_ids)")
        if code_softmax not in CODE_SOFTMAXES:
            raise ValueError(f"align.code_softmax={code_softmax!r}; choose from {list(CODE_SOFTMAXES)}")
        if hint_smoothing < 0:
            raise ValueError(f"align.hint_smoothing={hint_smoothing:g}; it must be >= 0")
        if not 0 < hint_smoothing_decay <= 1:
            raise ValueError(f"align.hint_smoothing_decay={hint_smoothing_decay:g}; it must be in (0, 1]")
        if code_softmax == "level" and not len(code_token_ids):
            raise ValueError("align.code_softmax=level needs the token ids of the location codes (code_token_ids)")
        # logger=False: the stage logs the run's whole configuration as the HPARAMS of its dashboard.
        self.save_hyperparameters(ignore=["model", "generation_prompts", "generation_fn", "evaluator", "first_code_ids", "code_token_ids"], logger=False)
        self.first_code_ids = torch.tensor(sorted(first_code_ids), dtype=torch.long)
        self.code_levels = CodeLevels(code_token_ids) if len(code_token_ids) else None
        self.model = model
        self.objectives = sorted({OBJECTIVE[t] for t in tasks})
        self.train_losses = torch.nn.ModuleDict({o: MeanMetric() for o in self.objectives})
        self.train_loss = MeanMetric()
        self.val_losses = torch.nn.ModuleDict({o: MeanMetric() for o in self.objectives})
        self.val_loss = MeanMetric()
        self.generation_prompts = list(generation_prompts)
        self.generation_fn = generation_fn
        self.evaluator = evaluator
        # Checkpoints carry trainable parameters only; the frozen base comes from the model files.
        self.strict_loading = False
        self._t_batch = 0.0
        self._validations = 0

    # -- the shared step ----------------------------------------------------------------------
    def _decoder_and_head(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.model, base.get_output_embeddings()

    def model_step(self, batch: dict[str, Any], train: bool = False) -> dict[str, Tensor]:
        """Loss of a batch (``loss``: what is differentiated; ``mean_loss``: its per-batch mean for logging),
        plus per-sample sums and counts. ``train``: weigh the codes' first tokens by ``first_code_weight`` and
        add ``hint_smoothing``'s term in ``loss`` (``mean_loss`` and the per-sample sums stay plain)."""
        decoder, head = self._decoder_and_head()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"][:, 1:]
        where = labels != -100
        logits = head(hidden[:, :-1][where]).float()
        if self.hparams.code_softmax == "level":
            token_loss = self.code_levels.cross_entropy(logits, labels[where])
        else:
            token_loss = F.cross_entropy(logits, labels[where], reduction="none")
        train_loss = token_loss
        if train and self.hparams.hint_smoothing and "hint_ids" in batch:
            train_loss = token_loss + float(self.hparams.hint_smoothing) * self._hint_loss(logits, batch["hint_ids"][:, 1:][where])
        rows = where.nonzero()[:, 0]
        n = labels.shape[0]
        per_sample = torch.zeros(n, device=token_loss.device).index_add_(0, rows, token_loss.detach())
        counts = torch.zeros(n, device=token_loss.device).index_add_(0, rows, torch.ones_like(token_loss))
        if self.hparams.loss_reduction == "token":
            mean = token_loss.detach().mean()
            if train and self.hparams.first_code_weight != 1.0:
                loss = (train_loss * self._first_code_weighted(torch.ones_like(token_loss), labels[where])).mean()
            else:
                loss = train_loss.mean()
        else:
            # Each answer's token mean, summed with gradients, over the nominal batch size or the answers
            # present if more. A sample is one answer; a whole-trajectory sample is one per trained visit
            # (the collate's label_weight and units; batches built by hand have neither).
            if "label_weight" in batch:
                weight = batch["label_weight"][:, 1:][where].to(token_loss.dtype)
                answers = int(batch["units"].sum())
            else:
                weight = 1.0 / counts.clamp(min=1)[rows]
                answers = int((counts > 0).sum())
            divisor = max(int(self.hparams.batch_size), answers, 1)
            mean = (token_loss.detach() * weight).sum() / (answers or divisor)
            if train and self.hparams.first_code_weight != 1.0:
                weight = self._first_code_weighted(weight, labels[where])
            loss = (train_loss * weight).sum() / divisor
        return {"loss": loss, "mean_loss": mean, "sample_loss": per_sample, "sample_tokens": counts}

    def _hint_loss(self, logits: Tensor, hints: Tensor) -> Tensor:
        """Per labelled token: the mean cross-entropy of its hinted places' first tokens ``hints`` ``(N, H)``
        (``-1``: none; 0 where a token has none), the k-th weighing ``hint_smoothing_decay``^k, over the first code
        level (``code_softmax=level``) or the vocabulary, as its own label's."""
        valid = hints >= 0
        out = torch.zeros(logits.shape[0], device=logits.device, dtype=logits.dtype)
        has = valid.any(1)
        if not bool(has.any()):
            return out
        z, h, v = logits[has], hints[has], valid[has]
        if self.hparams.code_softmax == "level":
            ids = self.code_levels.ids[0].to(z.device)
            z = z.gather(1, ids.clamp(min=0).expand(z.shape[0], -1)).masked_fill(ids < 0, float("-inf"))
            _, h = self.code_levels.of(h.clamp(min=0))
        logp = torch.where(v, z.log_softmax(-1).gather(1, h.clamp(min=0)), 0.0)  # a padded slot is 0, never -inf × 0
        w = v * float(self.hparams.hint_smoothing_decay) ** torch.arange(v.shape[1], device=v.device, dtype=logp.dtype)
        out[has] = -(logp * w).sum(1) / w.sum(1)
        return out

    def _first_code_weighted(self, weight: Tensor, targets: Tensor) -> Tensor:
        """``weight`` times ``first_code_weight`` where ``targets`` is a code's first token, rescaled to the same sum."""
        first = torch.isin(targets, self.first_code_ids.to(targets.device))
        scaled = weight * torch.where(first, float(self.hparams.first_code_weight), 1.0).to(weight.dtype)
        return scaled * (weight.sum() / scaled.sum().clamp(min=1e-12))

    def _update(self, metrics: torch.nn.ModuleDict, batch: dict[str, Any], out: dict[str, Tensor], total: MeanMetric) -> None:
        tokens = out["sample_tokens"].sum()
        if tokens > 0:
            total.update(out["sample_loss"].sum() / tokens, weight=tokens)
        for objective in self.objectives:
            sel = torch.tensor([OBJECTIVE[t] == objective for t in batch["task"]], device=out["sample_loss"].device)
            tokens = out["sample_tokens"][sel].sum()
            if tokens > 0:
                metrics[objective].update(out["sample_loss"][sel].sum() / tokens, weight=tokens)

    # -- training -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # from_pretrained leaves the model in eval mode and Lightning keeps submodule modes as
        # they are: without this, LoRA dropout would be off during training.
        self.model.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t_batch = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self.model_step(batch, train=True)
        self._update(self.train_losses, batch, out, self.train_loss)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The norm of what the optimiser is about to apply, before Lightning's clipping.
        grads = [p.grad.detach().float().norm() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self.log("align/grad_norm", torch.stack(grads).norm(), on_step=True, on_epoch=False)
        self.log("align/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._t_batch
        real = int(batch["attention_mask"].sum())
        total = batch["attention_mask"].numel()
        bs = batch["input_ids"].shape[0]
        self.log("align/tokens_per_s", real / max(seconds, 1e-9), batch_size=bs)
        self.log("align/padding_share", 1.0 - real / total, batch_size=bs)
        every = max(int(getattr(self.trainer, "log_every_n_steps", 1) or 1), 1)
        last = batch_idx + 1 == self.trainer.num_training_batches
        if (self.global_step % every == 0) or last:
            self._log_losses({"": self.train_loss}, "train", batch_size=bs, prog_bar=True)
            self._log_losses(self.train_losses, "train", batch_size=bs)
            self.log("align/peak_rss_mb", peak_rss_mb(), batch_size=bs)
            if torch.cuda.is_available() and self.device.type == "cuda":
                self.log("align/peak_cuda_mb", torch.cuda.max_memory_allocated(self.device) / 2**20, batch_size=bs)
        if self._final_step():
            # Training ends with a validation (its losses and the decoding metrics) also where
            # trainer.val_check_interval does not divide the steps (170 steps at 90: Lightning validates at 90
            # only) or max_steps ends an epoch early. A stop request makes Lightning's loop validate at this
            # batch (it does so for early stopping); the run stops here anyway, and a validation that was due
            # at this batch runs once. Lightning ignores the request, and validates as scheduled only, where
            # min_steps / min_epochs are not yet met at this batch or check_val_every_n_epoch skips this epoch.
            self.trainer.should_stop = True

    def _final_step(self) -> bool:
        """Whether the optimizer step just taken is the run's last (its whole schedule, over all epochs; never
        for an open-ended run, whose estimate is infinite, or -1 for a loader without a length)."""
        total = self.trainer.estimated_stepping_batches
        return total is not None and math.isfinite(total) and total > 0 and self.global_step >= int(total)

    # -- validation ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model_step(batch)
        self._update(self.val_losses, batch, out, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_losses({"": self.val_loss}, "val", prog_bar=True)
        self._log_losses(self.val_losses, "val")
        if self.trainer.sanity_checking:
            return
        self._validations += 1
        if not (self._final_step() or self._validations % max(int(self.hparams.evaluate_every), 1) == 0):
            return
        if self.evaluator is not None:
            for name, value in self.evaluator(self.model).items():
                self.log(f"align/val/{name}", float(value), prog_bar=name == "acc@1", sync_dist=True)
        if self.generation_prompts and self.generation_fn is not None and self.global_rank == 0:
            self._log_generations()

    def _log_losses(self, metrics: dict[str, Any], split: str, **kwargs: Any) -> None:
        """Log ``align/<split>/loss_<objective>`` (``align/<split>/loss`` for ``""``) and reset. ``compute`` is a collective under DDP, so with
        several processes every rank computes every metric (a rank whose batches lacked a task gets
        NaN, which is not logged); alone, only the metrics that saw data are computed."""
        distributed = self.trainer.world_size > 1
        for objective, metric in metrics.items():
            if not (distributed or metric.update_called):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "compute before update" on a rank without that task
                value = metric.compute()
            metric.reset()
            if torch.isfinite(value):
                self.log(f"align/{split}/loss_{objective}" if objective else f"align/{split}/loss", value, **kwargs)

    def _log_generations(self) -> None:
        prompts = [p for p, _ in self.generation_prompts]
        outputs = self.generation_fn(self.model, prompts)
        lines = ["| prompt (end) | expected | generated |", "|---|---|---|"]
        for (prompt, expected), got in zip(self.generation_prompts, outputs):
            cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append(f"| …{cell(prompt[-160:])} | {cell(expected)} | {cell(got)} |")
        logger = self.logger
        if logger is not None and hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text("align/generations", "\n".join(lines), global_step=self.global_step)

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(total * hp.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable parameters as optimizer groups: the LoRA B matrices at ``lr x lora_plus_ratio``
        (LoRA+), everything else (A matrices, new token rows) at ``lr``; one group when the ratio is 1."""
        hp = self.hparams
        ratio = float(hp.lora_plus_ratio)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        b = [p for n, p in named if ".lora_B." in n]
        if ratio == 1.0 or not b:
            return [{"params": [p for _, p in named]}]
        rest = [p for n, p in named if ".lora_B." not in n]
        # LambdaLR scales each group's own initial_lr, so the ratio holds through warm-up and decay.
        return [{"params": rest}, {"params": b, "lr": float(hp.lr) * ratio}]

    # -- checkpoints --------------------------------------------------------------------------
    def trainable_keys(self) -> set[str]:
        """State-dict keys of the trainable parameters (as the module names them)."""
        return {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming from a mid-epoch checkpoint: Lightning restarts the epoch's data iterator, so the
        # data module's batch sampler skips the batches already trained (``processed`` counts the
        # batch whose end triggered the save) and the run continues exactly where it stopped.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        done = int(progress.get("current", {}).get("processed", 0) or 0)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "resume_skip"):
            datamodule.resume_skip = done
        missing = self.trainable_keys() - set(checkpoint["state_dict"])
        if missing:
            raise RuntimeError(
                f"checkpoint lacks {len(missing)} trainable parameters (e.g. {sorted(missing)[:3]}): "
                "it was written for a different adapter configuration"
            )


__all__ = ["LOSS_REDUCTIONS", "OBJECTIVE", "AlignmentModule"]
