"""Ranking locations with the aligned LLM: constrained beam search over prompts in batches, and the
exact check (every valid code scored by teacher forcing) that tells how often beam search misses."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_modules.constrained_decoding import (
    beam_search,
    exact_scores,
    prefill,
    rank_exact,
    sampled_beam_search,
)
from lightning_modules.hardware import autocast
from location_tokenizers.codes import level_token

DECODINGS = ("beam", "sampled_beams")


def rank_prompts(model: torch.nn.Module, encoder: Any, trie: Any, prompts: list[str], num_beams: int,
                 batch_size: int, precision: str = "32-true", decoding: str = "beam", seed: int = 0,
                 progress: Any = None, share_prefix: bool = True, min_shared: int = 32,
                 code_softmax: str = "vocab") -> tuple[np.ndarray, np.ndarray]:
    """Constrained beam search over ``prompts`` in batches; rows in input order.

    ``precision`` is the run's resolved Lightning precision: ``bf16-mixed`` decodes under bf16
    autocast, as the model was trained (the scores that rank the beams are accumulated in float32).
    ``decoding``: ``beam`` (deterministic) or ``sampled_beams`` (the official protocol, seeded per batch).
    ``progress``: a :class:`lightning_modules.progress.ProgressStyle` to report cases/s and the ETA (None: silent).
    ``share_prefix`` (``eval.share_prefix``, ``beam`` only): the tokens every prompt starts with (chat header,
    system text) are prefilled once per run, and prompts that share at least ``min_shared`` more tokens (a
    user's memory or profile) are batched together with what they share prefilled once per batch; the other
    prompts are batched by length, as without it. Off: batches of similar length, each prompt prefilled whole.
    The rankings agree (``tests/test_evaluation.py``); the scores differ by float rounding.
    ``code_softmax`` (``align.code_softmax``, ``beam`` only): ``level`` normalises each step's scores over that
    level's code tokens, as a model trained with it learned them.
    """
    from contextlib import nullcontext
    from functools import partial

    if decoding not in DECODINGS:
        raise ValueError(f"eval.decoding={decoding!r}; choose from {list(DECODINGS)}")
    if code_softmax != "vocab" and decoding != "beam":
        raise ValueError(f"eval.decoding={decoding} scores codes over the vocabulary (Hugging Face generate); "
                         f"align.code_softmax={code_softmax} needs eval.decoding=beam")

    ids = encoder.prompt_ids(prompts)
    shared = share_prefix and decoding == "beam" and len(ids) > 0
    locs = np.full((len(prompts), num_beams), -1, dtype=np.int64)
    scores = np.full((len(prompts), num_beams), -np.inf)
    device = next(model.parameters()).device
    trunk, trunk_len = None, 0
    if shared:  # the tokens every prompt starts with, prefilled once
        lex = sorted(range(len(ids)), key=ids.__getitem__)
        trunk_len = _common_prefix([ids[lex[0]], ids[lex[-1]]])  # sorted: the ends share what all share
        with autocast(precision, device.type):
            trunk = prefill(model, torch.tensor([ids[lex[0]][:trunk_len]], device=device))
        batches = _shared_batches(ids, lex, batch_size, trunk_len + min_shared)
    else:
        order = np.argsort([-len(r) for r in ids], kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with progress.loop("test", len(prompts), "cases") if progress is not None else nullcontext() as bar:
        for start, rows in enumerate(batches):
            start *= batch_size  # the sampled beams' seed, as before
            with autocast(precision, device.type):
                if shared:
                    cut = max(_common_prefix([ids[i] for i in rows]), trunk_len)
                    first = ids[rows[0]]
                    own = cut > trunk_len  # a fresh copy of the trunk, extended: beam_search may consume it
                    prefix = prefill(model, torch.tensor([first[trunk_len:cut]], device=device), trunk) if own else trunk
                    batch = encoder.pad_left([ids[i][cut:] for i in rows], device=device)
                    ranked = beam_search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=num_beams,
                                         prefix=prefix, consume_prefix=own, code_softmax=code_softmax)
                else:
                    batch = encoder.pad_left([ids[i] for i in rows], device=device)
                    search = partial(beam_search, code_softmax=code_softmax) if decoding == "beam" else partial(
                        sampled_beam_search, seed=seed + start, pad_token_id=encoder.pad_id)
                    ranked = search(model, batch["input_ids"], batch["attention_mask"], trie, num_beams=num_beams)
            locs[rows] = ranked.loc_ids.cpu().numpy()
            scores[rows] = ranked.scores.cpu().numpy()
            if bar is not None:
                bar.update(len(rows))
    return locs, scores


def _shared_batches(ids: list[list[int]], lex: list[int], batch_size: int, together: int) -> list[np.ndarray]:
    """Batches for :func:`rank_prompts` with ``share_prefix``: runs of prompts (``lex``: indices in token
    order) that share at least ``together`` tokens are batched among themselves, longest first; the
    rest are batched by length (less padding than token order would give them)."""
    runs, current = [], [lex[0]]
    for prev, cur in zip(lex, lex[1:]):
        if _common_prefix([ids[prev], ids[cur]]) >= together:
            current.append(cur)
        else:
            runs.append(current)
            current = [cur]
    runs.append(current)
    longest_first = lambda rows: sorted(rows, key=lambda i: -len(ids[i]))  # noqa: E731
    batches, alone = [], []
    for run in runs:
        if len(run) == 1:
            alone.extend(run)
            continue
        run = longest_first(run)
        batches.extend(np.array(run[i : i + batch_size], dtype=np.int64) for i in range(0, len(run), batch_size))
    alone = longest_first(alone)
    batches.extend(np.array(alone[i : i + batch_size], dtype=np.int64) for i in range(0, len(alone), batch_size))
    return batches


def _common_prefix(rows: list[list[int]]) -> int:
    """Length of the prefix all ``rows`` share, short of each row's last token (a prompt must keep one to
    give the first code's logits)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return max(n, 0)


def exact_agreement(model: torch.nn.Module, encoder: Any, trie: Any, table: Any, tokenizer: Any, prompts: list[str],
                    beam_locs: np.ndarray, precision: str = "32-true", code_softmax: str = "vocab") -> dict[str, float]:
    """How often beam search misses the exact ranking (teacher-forced scores of every code), both
    computed in the run's ``precision`` and normalised alike (``code_softmax``)."""

    tokens = [[level_token(lv, int(c)) for lv, c in enumerate(row)] for row in table.codes.tolist()]
    code_ids = torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in tokens], dtype=torch.long)
    device = next(model.parameters()).device
    miss, recall = [], []
    for i, prompt in enumerate(prompts):
        batch = encoder.prompt_batch([prompt], device=device)
        with autocast(precision, device.type):
            scores = exact_scores(model, batch["input_ids"], batch["attention_mask"], code_ids,
                                  level_token_ids=torch.stack(trie.level_token_ids) if code_softmax == "level" else None)
        exact = rank_exact(scores, torch.as_tensor(table.loc_ids), top=10).loc_ids[0].cpu().numpy()
        miss.append(float(exact[0] != beam_locs[i, 0]))
        recall.append(len(set(exact.tolist()) & set(beam_locs[i].tolist())) / len(exact))
    return {"cases": len(prompts), "top1_miss_rate": float(np.mean(miss)), "top10_recall": float(np.mean(recall))}
