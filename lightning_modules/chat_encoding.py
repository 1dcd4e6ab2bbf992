"""Instruction samples → token ids through the model's chat template, with the prompt masked.

Every sample is a two-turn chat: the system prompt and the sample's ``prompt`` as the user turn,
then an assistant turn ``response_prefix + target``. The loss covers the assistant turn only
(``labels = -100`` on everything before it), which is what TRL's removed completion-only collator
used to do.

The template is rendered once with placeholders and split around them, so encoding 90k samples
is one batched call of the fast tokenizer, not 90k Jinja renders. Prompt and answer are tokenised
separately and concatenated: generation sees exactly the prompt ids it was trained on.

A whole-trajectory next-location sample (``data.samples.next_format=trajectory``: its visits are the
answer, ``labelled_runs`` says which of its runs of consecutive code tokens are trained: the rendering
knows which runs are its targets' codes and which are visit hints beside them) is tokenised as one string, exactly
as the per-prefix prompts of the same trajectory are, and only the code tokens of those visits get
labels: the loss at each of them is the loss its per-prefix sample would have on its code.

Over-long samples first lose their oldest visits (:func:`datamodules.fitting.fit_history`, fed by
:meth:`ChatEncoder.lengths`). What still does not fit — a sample without visits, or one whose
profile alone is too long — keeps its chat header, the end of the prompt and the answer as a last
resort; those are counted per task and logged, never silently dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

log = logging.getLogger(__name__)

_USER, _ANSWER = "\x00", "\x01"


PROMPT_FORMATS = ("chat", "inst")
ENCODE_ROWS = 4096  # samples tokenised at a time (see ChatEncoder.encode)


def chat_parts(tokenizer: Any, system_prompt: str, prompt_format: str = "chat") -> tuple[str, str, str]:
    """``(head, tail, end)``: a prompt renders as ``head + user_text + tail``, an answer ends with ``end``.

    ``chat``: the model's own chat template (what an instruct model was tuned on); models without one
    get a plain ``### System/User/Assistant`` layout. ``inst``: the official QT-Mob layout,
    ``<bos>[INST] {system + instruction} [/INST] {response}<eos>`` whatever the model.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"align.prompt_format={prompt_format!r}; choose from {list(PROMPT_FORMATS)}")
    if prompt_format == "inst":
        return f"{tokenizer.bos_token or ''}[INST] {system_prompt}\n", " [/INST] ", tokenizer.eos_token or ""
    if getattr(tokenizer, "chat_template", None):
        user = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": _USER}],
            tokenize=False, add_generation_prompt=True,
        )
        full = tokenizer.apply_chat_template(
            [{"role": "system", "content": system_prompt}, {"role": "user", "content": _USER},
             {"role": "assistant", "content": _ANSWER}],
            tokenize=False,
        )
        head, tail = user.split(_USER)
        end = full.split(_ANSWER, 1)[1].rstrip()
        return head, tail, end or (tokenizer.eos_token or "")
    return f"### System:\n{system_prompt}\n### User:\n", "\n### Assistant:\n", tokenizer.eos_token or ""


@dataclass
class EncodedSamples:
    """Token ids of many samples in one flat array (lists of Python ints would take ~30× the memory).

    Attributes:
        ids: All samples' ids, concatenated (int32).
        offsets: ``ids[offsets[i]:offsets[i+1]]`` is sample ``i``.
        prompt_len: Number of prompt (unlabelled) tokens of each sample.
        task: Task name of each sample.
        truncated: How many samples were cut to ``max_length`` by tokens (the last resort).
        truncated_by_task: The same per task.
        label_masks: Per whole-trajectory sample, which of its tokens are labelled (the others
            label everything from ``prompt_len`` on).
        hint_masks: Per whole-trajectory sample, the first tokens of its trained visits' hinted places
            (:meth:`hint_mask`; ``align.hint_smoothing``).
    """

    ids: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    task: np.ndarray
    truncated: int = 0
    truncated_by_task: dict[str, int] | None = None
    label_masks: dict[int, np.ndarray] | None = None
    hint_masks: dict[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample."""
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """``(ids, prompt_len)`` of sample ``i``."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]], int(self.prompt_len[i])

    def label_mask(self, i: int) -> np.ndarray | None:
        """The labelled tokens of sample ``i`` if it is a whole-trajectory sample, else None."""
        return None if not self.label_masks else self.label_masks.get(i)

    def hint_mask(self, i: int) -> np.ndarray | None:
        """The first tokens of the hinted places of sample ``i``'s trained visits (True; each comes after the
        previous trained visit's code and before its own), if it is a whole-trajectory sample, else None."""
        return None if not self.hint_masks else self.hint_masks.get(i)


def true_runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(flags).astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def code_runs(ids: Sequence[int] | np.ndarray, code_ids: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of consecutive location-code tokens in ``ids``: one per written code (a
    visit's, a hinted place's or a memory place's)."""
    return true_runs(np.isin(np.asarray(ids), code_ids))


class ChatEncoder:
    """Encodes rendered samples for one tokenizer and collates them into training batches.

    Args:
        tokenizer: The LLM's tokenizer (location tokens already added).
        system_prompt: The system turn of every sample.
        max_length: Longest sequence in tokens.
        keep_head: Tokens kept from the start of an over-long prompt (the chat header and system turn).
        prompt_format: ``chat`` or ``inst`` (see :func:`chat_parts`).
        code_token_ids: Ids of the location-code tokens (needed for whole-trajectory samples).
        next_end: Whether a per-prefix next-location answer ends with the end-of-turn token. False where the
            training samples are whole trajectories (``next_format=trajectory``), in which a code is never followed
            by that token: the validation samples are then labelled on the code alone, so that their loss
            measures what training trains (with it, such runs logged a validation loss of 9-10 against
            a training loss of ~4).
    """

    def __init__(self, tokenizer: Any, system_prompt: str, max_length: int = 1024, keep_head: int = 64,
                 prompt_format: str = "chat", code_token_ids: Sequence[int] | None = None, next_end: bool = True) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_length = int(max_length)
        self.keep_head = int(keep_head)
        self.prompt_format = prompt_format
        self.head, self.tail, self.end = chat_parts(tokenizer, system_prompt, prompt_format)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.pad_id = int(tokenizer.pad_token_id)
        self.code_token_ids = np.array(sorted(code_token_ids or []), dtype=np.int64)
        self.next_end = bool(next_end)

    def _answer(self) -> pl.Expr:
        """Each sample's answer text: its target and the end-of-turn token (see ``next_end``)."""
        answer = pl.concat_str([pl.col("target"), pl.lit(self.end)])
        return answer if self.next_end else pl.when(pl.col("task") == "next").then(pl.col("target")).otherwise(answer)

    def prompt_texts(self, samples: pl.DataFrame) -> list[str]:
        """The text the model is given before it answers (chat header, user turn, response prefix)."""
        return samples.select(
            pl.concat_str([pl.lit(self.head), pl.col("prompt"), pl.lit(self.tail), pl.col("response_prefix")])
        ).to_series().to_list()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def lengths(self, samples: pl.DataFrame) -> np.ndarray:
        """Tokens of each sample (prompt + answer), as :meth:`encode` would count them before any cut."""
        out = []
        for start in range(0, samples.height, ENCODE_ROWS):
            part = samples.slice(start, ENCODE_ROWS)
            prompts = self._ids(self.prompt_texts(part))
            answers = self._ids(part.select(self._answer()).to_series().to_list())
            out.append(np.array([len(p) + len(a) for p, a in zip(prompts, answers)], dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _whole(self, samples: pl.DataFrame, prompts: list[list[int]]) -> dict[int, tuple[list[int], np.ndarray, np.ndarray]]:
        """Ids, label mask and hint mask (:meth:`EncodedSamples.hint_mask`) of each whole-trajectory sample
        (row number -> (ids, mask, hints))."""
        if "labelled_runs" not in samples.columns or samples["labelled_runs"].null_count() == samples.height:
            return {}
        if not self.code_token_ids.size:
            raise ValueError("whole-trajectory samples (data.samples.next_format=trajectory) need the encoder's code_token_ids")
        rows = samples.with_row_index("_row").filter(pl.col("labelled_runs").is_not_null())
        texts = self.prompt_texts(rows)
        full = self._ids([t + a + self.end for t, a in zip(texts, rows["target"].to_list())])
        hinted_runs = rows["hint_runs"].to_list() if "hint_runs" in rows.columns else [None] * rows.height
        out = {}
        for row, ids, labelled, hinted in zip(rows["_row"].to_list(), full, rows["labelled_runs"].to_list(), hinted_runs):
            # The answer's code runs are those after the prompt's (user memory may hold codes); a visit hint's
            # places are runs too, which ``labelled`` (the rendering's run numbers) skips.
            runs = code_runs(ids, self.code_token_ids)[len(code_runs(prompts[row], self.code_token_ids)):]
            lengths = {end - start for start, end in runs}
            if (labelled and max(labelled) >= len(runs)) or len(lengths) > 1:
                raise ValueError(f"a whole-trajectory sample labels code runs up to {max(labelled, default=0)} of an answer "
                                 f"with {len(runs)} runs of lengths {sorted(lengths)}: the rendering's "
                                 "layout and the tokenizer's code tokens disagree (two codes written without a separator?)")
            mask = np.zeros(len(ids), dtype=bool)
            hints = np.zeros(len(ids), dtype=bool)
            for j, k in enumerate(labelled):
                mask[runs[k][0]:runs[k][1]] = True
                for h in range(max(k - (hinted[j] if hinted is not None else 0), 0), k):
                    hints[runs[h][0]] = True
            out[row] = (ids, mask, hints)
        return out

    def encode(self, samples: pl.DataFrame) -> EncodedSamples:
        """Tokenise every sample (prompt and answer separately) and apply the length limit.

        Done ``ENCODE_ROWS`` samples at a time: the tokenizer hands back Python lists (~60 bytes a
        token with their objects), so a whole NYC split at once would peak at gigabytes before it
        is packed into the int32 array (4 bytes a token)."""
        parts = [self._encode_rows(samples.slice(start, ENCODE_ROWS)) for start in range(0, samples.height, ENCODE_ROWS)]
        if not parts:
            return EncodedSamples(np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), samples["task"].to_numpy())
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        masks, hint_masks, by_task, first = {}, {}, {}, 0
        for p in parts:
            masks.update({first + i: m for i, m in (p.label_masks or {}).items()})
            hint_masks.update({first + i: m for i, m in (p.hint_masks or {}).items()})
            for task, n in (p.truncated_by_task or {}).items():
                by_task[task] = by_task.get(task, 0) + n
            first += len(p)
        truncated = sum(p.truncated for p in parts)
        if truncated:
            log.warning("%d of %d samples still had more than max_length=%d tokens after history cuts and were "
                        "shortened by tokens (prompt middle cut): %s", truncated, samples.height, self.max_length, by_task)
        return EncodedSamples(np.concatenate([p.ids for p in parts]), offsets, np.concatenate([p.prompt_len for p in parts]),
                              samples["task"].to_numpy(), truncated, by_task, masks or None, hint_masks or None)

    def _encode_rows(self, samples: pl.DataFrame) -> EncodedSamples:
        prompts = self._ids(self.prompt_texts(samples))
        whole = self._whole(samples, prompts)
        # A whole-trajectory sample is tokenised as one string by _whole: its answer alone is not needed.
        answer = self._answer()
        if whole:
            answer = pl.when(pl.col("labelled_runs").is_null()).then(answer).otherwise(pl.lit(""))
        answers = self._ids(samples.select(answer).to_series().to_list())
        chunks, prompt_len, truncated = [], np.empty(len(prompts), dtype=np.int32), 0
        tasks = samples["task"].to_list()
        by_task: dict[str, int] = {}
        masks: dict[int, np.ndarray] = {}
        hint_masks: dict[int, np.ndarray] = {}
        for i, (p, a) in enumerate(zip(prompts, answers)):
            if i in whole:
                ids, mask, hints = whole[i]
                if len(ids) > self.max_length:  # the newest visits go; a code cut in half loses its label
                    truncated += 1
                    by_task[tasks[i]] = by_task.get(tasks[i], 0) + 1
                    cut_run = mask[self.max_length]  # the cut falls inside a code
                    ids, mask, hints = ids[: self.max_length], mask[: self.max_length].copy(), hints[: self.max_length]
                    j = len(mask) - 1
                    while cut_run and j >= 0 and mask[j]:
                        mask[j] = False
                        j -= 1
                chunks.append(ids)
                chunks.append([])
                prompt_len[i] = int(np.argmax(mask)) if mask.any() else len(ids)
                masks[i] = mask
                hint_masks[i] = hints
                continue
            if len(p) + len(a) > self.max_length:
                truncated += 1
                by_task[tasks[i]] = by_task.get(tasks[i], 0) + 1
                a = a[: max(self.max_length - self.keep_head - 8, 1)]
                room = self.max_length - len(a) - self.keep_head
                p = p[: self.keep_head] + (p[len(p) - room :] if room > 0 else [])
            chunks.append(p)
            chunks.append(a)
            prompt_len[i] = len(p)
        lengths = np.array([len(c) for c in chunks], dtype=np.int64).reshape(-1, 2).sum(1)
        offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for c in chunks for t in c), dtype=np.int32, count=int(offsets[-1]))
        return EncodedSamples(ids, offsets, prompt_len, samples["task"].to_numpy(), truncated, by_task, masks or None,
                              hint_masks or None)

    def collate(self, items: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (−100 on prompt and padding), and
        what the ``sample`` loss weighs them by: ``label_weight`` (1 / tokens of its answer, for a
        whole-trajectory sample 1 / tokens of its visit's code) and ``units`` (answers per row: 1, or
        the trained visits of a whole-trajectory sample).

        Where a whole-trajectory sample's visits have hints (a sixth element, :meth:`EncodedSamples.hint_mask`),
        also ``hint_ids`` ``(n, width, H)``: at the first token of each trained code, the first tokens of its
        visit's hinted places (``-1``: none), for ``align.hint_smoothing``.

        Args:
            items: ``(ids, prompt_len, sample index, task)`` per sample, optionally with a fifth
                element, the label mask of a whole-trajectory sample (:meth:`EncodedSamples.label_mask`),
                and a sixth, its hint mask.
        """
        width = max(len(item[0]) for item in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        weight = torch.zeros((n, width), dtype=torch.float32)
        units = torch.zeros(n, dtype=torch.long)
        hinted: list[tuple[int, int, np.ndarray]] = []
        for row, (ids, plen, *rest) in enumerate(items):
            t = torch.from_numpy(ids.astype(np.int64))
            input_ids[row, : len(t)] = t
            attention[row, : len(t)] = 1
            mask = rest[2] if len(rest) > 2 and rest[2] is not None else None
            if mask is None:
                labels[row, plen : len(t)] = t[plen:]
                weight[row, plen : len(t)] = 1.0 / max(len(t) - plen, 1)
                units[row] = int(len(t) > plen)
                continue
            m = torch.from_numpy(mask)
            labels[row, : len(t)][m] = t[m]
            hint_mask = rest[3] if len(rest) > 3 else None
            previous = 0
            for start, end in true_runs(mask):
                weight[row, start:end] = 1.0 / (end - start)
                units[row] += 1
                if hint_mask is not None and (at := np.flatnonzero(hint_mask[previous:start])).size:
                    hinted.append((row, start, ids[previous + at]))
                previous = end
        extra = {}
        if hinted:
            width_h = max(len(h) for _, _, h in hinted)
            hint_ids = torch.full((n, width, width_h), -1, dtype=torch.long)
            for row, start, h in hinted:
                hint_ids[row, start, : len(h)] = torch.from_numpy(h.astype(np.int64))
            extra["hint_ids"] = hint_ids
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "label_weight": weight,
            "units": units,
            "index": torch.tensor([item[2] for item in items], dtype=torch.long),
            "task": [item[3] for item in items],
            **extra,
        }

    def prompt_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of prompts (from :meth:`prompt_texts`), as :meth:`prompt_batch` feeds them."""
        return self._ids(list(texts))

    def prompt_batch(self, texts: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Left-padded prompts for generation (the last column is every prompt's last token)."""
        return self.pad_left(self._ids(list(texts)), device)

    def pad_left(self, rows: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` of token id rows, left-padded to the longest."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


__all__ = ["PROMPT_FORMATS", "ChatEncoder", "EncodedSamples", "chat_parts", "code_runs", "true_runs"]
