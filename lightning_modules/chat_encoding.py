"""Instruction samples → token ids through the model's chat template, with the prompt masked.

Every sample is a two-turn chat: the system prompt and the sample's ``prompt`` as the user turn,
then an assistant turn ``response_prefix + target``. The loss covers the assistant turn only
(``labels = -100`` on everything before it), which is what TRL's removed completion-only collator
used to do.

The template is rendered once with placeholders and split around them, so encoding 90k samples
is one batched call of the fast tokenizer, not 90k Jinja renders. Prompt and answer are tokenised
separately and concatenated: generation sees exactly the prompt ids it was trained on.

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
    """

    ids: np.ndarray
    offsets: np.ndarray
    prompt_len: np.ndarray
    task: np.ndarray
    truncated: int = 0
    truncated_by_task: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.prompt_len)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per sample."""
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, int]:
        """``(ids, prompt_len)`` of sample ``i``."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]], int(self.prompt_len[i])


class ChatEncoder:
    """Encodes rendered samples for one tokenizer and collates them into training batches.

    Args:
        tokenizer: The LLM's tokenizer (location tokens already added).
        system_prompt: The system turn of every sample.
        max_length: Longest sequence in tokens.
        keep_head: Tokens kept from the start of an over-long prompt (the chat header and system turn).
        prompt_format: ``chat`` or ``inst`` (see :func:`chat_parts`).
    """

    def __init__(self, tokenizer: Any, system_prompt: str, max_length: int = 1024, keep_head: int = 64,
                 prompt_format: str = "chat") -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_length = int(max_length)
        self.keep_head = int(keep_head)
        self.prompt_format = prompt_format
        self.head, self.tail, self.end = chat_parts(tokenizer, system_prompt, prompt_format)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.pad_id = int(tokenizer.pad_token_id)

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
        prompts = self._ids(self.prompt_texts(samples))
        answers = self._ids(samples.select(pl.concat_str([pl.col("target"), pl.lit(self.end)])).to_series().to_list())
        return np.array([len(p) + len(a) for p, a in zip(prompts, answers)], dtype=np.int64)

    def encode(self, samples: pl.DataFrame) -> EncodedSamples:
        """Tokenise every sample (prompt and answer separately) and apply the length limit."""
        prompts = self._ids(self.prompt_texts(samples))
        answers = self._ids(samples.select(pl.concat_str([pl.col("target"), pl.lit(self.end)])).to_series().to_list())
        chunks, prompt_len, truncated = [], np.empty(len(prompts), dtype=np.int32), 0
        tasks = samples["task"].to_list()
        by_task: dict[str, int] = {}
        for i, (p, a) in enumerate(zip(prompts, answers)):
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
        if truncated:
            log.warning("%d of %d samples still had more than max_length=%d tokens after history cuts and were "
                        "shortened by tokens (prompt middle cut): %s", truncated, len(prompts), self.max_length, by_task)
        return EncodedSamples(ids, offsets, prompt_len, samples["task"].to_numpy(), truncated, by_task)

    def collate(self, items: Sequence[tuple[np.ndarray, int, int, str]]) -> dict[str, Any]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (−100 on prompt and padding).

        Args:
            items: ``(ids, prompt_len, sample index, task)`` per sample.
        """
        width = max(len(ids) for ids, *_ in items)
        n = len(items)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        for row, (ids, plen, _, _) in enumerate(items):
            t = torch.from_numpy(ids.astype(np.int64))
            input_ids[row, : len(t)] = t
            attention[row, : len(t)] = 1
            labels[row, plen : len(t)] = t[plen:]
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "index": torch.tensor([i for _, _, i, _ in items], dtype=torch.long),
            "task": [task for *_, task in items],
        }

    def prompt_batch(self, texts: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Left-padded prompts for generation (the last column is every prompt's last token)."""
        rows = self._ids(list(texts))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


__all__ = ["PROMPT_FORMATS", "ChatEncoder", "EncodedSamples", "chat_parts"]
