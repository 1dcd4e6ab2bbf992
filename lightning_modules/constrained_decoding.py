"""Decoding constrained to valid location codes: batched beam search and exact scoring.

**Beam search** (:func:`beam_search`): the prompts are prefilled once; the KV cache is then
repeated to the beams (Hugging Face's beam search copies every prompt ``num_beams`` times *before*
prefilling, which costs ``num_beams`` times the prompt compute). Each of the ``L`` steps gathers
the log-probabilities of that level's ``K`` code tokens, masks the codes the trie does not allow
after each beam's prefix (a tensor lookup, no Python callback per beam), and keeps the best
``num_beams`` of ``num_beams × K`` candidates per prompt. It is deterministic: no sampling
(QT-Mob's official evaluation samples inside beam search, so its numbers move between runs).

Scores are exactly those of ``generate(num_beams=B, do_sample=False, prefix_allowed_tokens_fn=...)``:
log-softmax over the full vocabulary, then masking, summed over the code's tokens. All codes
have the same length, so length normalisation cannot change the ranking. With ``code_softmax="level"``
(for a model trained with ``align.code_softmax=level``) each step's log-softmax is taken over that level's
code tokens instead of the vocabulary: the probabilities the model was trained to give.

**Sampled beams** (:func:`sampled_beam_search`, ``eval.decoding=sampled_beams``): the official
evaluation, ``generate(do_sample=True, top_k=50, temperature=1, num_beams=B)`` with the trie as
``prefix_allowed_tokens_fn``, seeded. Slower (the Hugging Face loop) and it varies with the seed; it
is there to reproduce the official numbers' protocol.

**Exact scoring** (:func:`exact_scores`): the log-probability of every valid code by teacher
forcing, for catalogues small enough; it tells how often beam search misses the true top-k.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from location_tokenizers.trie import CodeTrie

# How a code token's probability is normalised: over the vocabulary (the paper) or over its level's code tokens.
CODE_SOFTMAXES = ("vocab", "level")


@dataclass
class Ranked:
    """Ranked locations per prompt.

    Attributes:
        loc_ids: ``(B, R)`` location ids, best first (``-1`` where fewer than ``R`` exist).
        scores: ``(B, R)`` summed log-probabilities of their codes (``-inf`` for ``-1``).
    """

    loc_ids: Tensor
    scores: Tensor


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids that ignore left padding (as ``generate`` computes them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(model: torch.nn.Module, input_ids: Tensor, cache: Any = None) -> Any:
    """The KV cache of one unpadded row ``(1, T)``, continuing ``cache`` (a copy is extended; None: from scratch).

    Used for a prefix that several prompts share (:func:`beam_search`'s ``prefix``)."""
    done = 0 if cache is None else cache.get_seq_length()
    if cache is not None:
        cache = copy.deepcopy(cache)
    if input_ids.shape[1] == 0:
        return cache
    pos = (done + torch.arange(input_ids.shape[1], device=input_ids.device)).unsqueeze(0)
    mask = torch.ones(1, done + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                 logits_to_keep=1).cache


def level_normalised(logp: Tensor, token_ids: Tensor) -> Tensor:
    """``logp`` (``(..., K)``: log-probabilities of one level's K code tokens, ``token_ids`` ``-1`` where a code
    has no token) renormalised over that level's tokens: a log-softmax over the level instead of the vocabulary."""
    valid = token_ids >= 0
    return logp - torch.logsumexp(logp.masked_fill(~valid, float("-inf")), dim=-1, keepdim=True)


@torch.no_grad()
def beam_search(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, trie: CodeTrie, num_beams: int = 15,
                prefix: Any = None, consume_prefix: bool = False, code_softmax: str = "vocab") -> Ranked:
    """Constrained beam search over the code trie for a batch of left-padded prompts.

    Args:
        model: A causal LM (plain or peft-wrapped) returning ``logits`` and ``past_key_values``.
        input_ids: ``(B, T)`` left-padded prompt ids (ending where the code starts).
        attention_mask: ``(B, T)``.
        trie: Valid codes (on the model's device).
        num_beams: Beams kept per prompt; also the number of ranked locations returned.
        prefix: The KV cache (batch 1, from :func:`prefill`) of tokens that every prompt of the batch starts
            with; ``input_ids`` then holds only what follows it (the pads sit between the two, masked). The
            scores are those of the whole prompts, up to float rounding; the prefix is computed once.
        consume_prefix: ``prefix`` is not used again by the caller, so it is extended in place instead of
            copied (a fresh :func:`prefill` per batch); False keeps it intact for the next batch.
        code_softmax: ``vocab`` (log-softmax over the vocabulary, as ``generate``) or ``level`` (over each
            level's code tokens: a model trained with ``align.code_softmax=level``).

    Returns:
        The ``num_beams`` best complete codes per prompt as location ids with their scores.
    """
    if code_softmax not in CODE_SOFTMAXES:
        raise ValueError(f"code_softmax={code_softmax!r}; choose from {list(CODE_SOFTMAXES)}")
    b, nb, k = input_ids.shape[0], int(num_beams), trie.codebook_size
    device = input_ids.device
    cache = None
    if prefix is not None:
        done = prefix.get_seq_length()
        cache = prefix if consume_prefix else copy.deepcopy(prefix)
        cache.batch_repeat_interleave(b)
        pos = _positions(attention_mask) + done
        attention_mask = torch.cat([torch.ones(b, done, dtype=attention_mask.dtype, device=device), attention_mask], dim=1)
    else:
        pos = _positions(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, cache=cache, use_cache=True,
                logits_to_keep=1)
    cache = out.cache
    logp = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(nb, dim=0)  # (B*nb, V)
    cache.batch_repeat_interleave(nb)
    mask = attention_mask.repeat_interleave(nb, dim=0)
    last_pos = pos[:, -1].repeat_interleave(nb, dim=0)
    # One live beam per prompt at the start (the others -inf), as in HF's beam search.
    beam_scores = torch.full((b, nb), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)
    node = trie.root(b * nb, device=device)
    offsets = (torch.arange(b, device=device) * nb).unsqueeze(1)
    for level in range(trie.num_levels):
        token_ids = trie.level_token_ids[level].to(device)  # (K,) code -> token id (-1: no token)
        children = trie._children(node, level).to(device)  # (B*nb, K)
        cand = logp.gather(1, token_ids.clamp(min=0).expand(logp.shape[0], k))
        if code_softmax == "level":
            cand = level_normalised(cand, token_ids)
        cand = torch.where(children >= 0, cand + beam_scores.unsqueeze(1), torch.full_like(cand, float("-inf")))
        top, flat = cand.view(b, nb * k).topk(nb, dim=1)
        src = (offsets + flat // k).view(-1)  # which beam each survivor extends
        code = (flat % k).view(-1)
        node = children[src, code]
        beam_scores = top.view(-1)
        node = torch.where(torch.isfinite(beam_scores), node, torch.full_like(node, -1))
        if level + 1 < trie.num_levels:
            cache.reorder_cache(src)
            mask = torch.cat([mask[src], torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos[src] + 1
            step = token_ids[code].clamp(min=0).unsqueeze(1)
            out = model(input_ids=step, attention_mask=mask, position_ids=last_pos.unsqueeze(1), cache=cache, use_cache=True)
            logp = out.logits[:, -1].float().log_softmax(-1)
    loc = trie.leaf_to_loc(node).to(device).view(b, nb)
    return Ranked(loc_ids=loc, scores=beam_scores.view(b, nb))


@torch.no_grad()
def sampled_beam_search(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, trie: CodeTrie, num_beams: int = 15,
                        top_k: int = 50, temperature: float = 1.0, seed: int = 0, pad_token_id: int = 0) -> Ranked:
    """The official QT-Mob decoding: beam search with sampling inside the beams, constrained to the trie.

    Returns:
        The ``num_beams`` returned codes per prompt, ordered by their sequence scores (``-1`` for a
        code that is not a location, which cannot happen while the trie constrains every step).
    """
    prefixes = trie.valid_prefixes()
    levels = [row.tolist() for row in trie.level_token_ids]
    code_of = {int(t): c for row in levels for c, t in enumerate(row) if t >= 0}
    n = input_ids.shape[1]
    eos = pad_token_id

    def allowed(_: int, sent: Tensor) -> list[int]:
        prefix = tuple(code_of.get(t, -1) for t in sent[n:].tolist())
        if len(prefix) >= trie.num_levels:
            return [eos]
        return [levels[len(prefix)][c] for c in prefixes.get(prefix, ())] or [eos]

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, num_beams=num_beams, num_return_sequences=num_beams,
            do_sample=True, top_k=top_k, temperature=temperature, max_new_tokens=trie.num_levels,
            prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True, pad_token_id=pad_token_id,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    codes = out.sequences[:, n : n + trie.num_levels]
    if codes.shape[1] < trie.num_levels:  # every sequence stopped early: nothing valid
        codes = torch.nn.functional.pad(codes, (0, trie.num_levels - codes.shape[1]), value=eos)
    locs = trie.decode_batch(codes).view(input_ids.shape[0], num_beams)
    scores = out.sequences_scores.float().view(input_ids.shape[0], num_beams)
    scores = torch.where(locs >= 0, scores, torch.full_like(scores, float("-inf")))
    order = scores.argsort(dim=1, descending=True, stable=True)
    return Ranked(locs.gather(1, order), scores.gather(1, order))


@torch.no_grad()
def exact_scores(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, code_token_ids: Tensor, chunk: int = 64,
    level_token_ids: Tensor | None = None,
) -> Tensor:
    """Log-probability of every code for every prompt, by teacher forcing.

    Args:
        model: A causal LM.
        input_ids: ``(B, T)`` left-padded prompts.
        attention_mask: ``(B, T)``.
        code_token_ids: ``(N, L)`` token ids of all N valid codes.
        chunk: Codes scored per forward pass.
        level_token_ids: ``(L, K)`` every level's code tokens (``-1``: none): each token's log-probability is
            then taken over its level's tokens (``code_softmax="level"``); None: over the vocabulary.

    Returns:
        ``(B, N)`` summed log-probabilities.
    """
    n, levels = code_token_ids.shape
    device = input_ids.device
    codes = code_token_ids.to(device)
    result = torch.empty(input_ids.shape[0], n, device=device)
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids = input_ids[row, keep].unsqueeze(0)
        out = model(input_ids=ids, use_cache=True)
        first = _code_logp(out.logits[0, -1].float(), codes[:, 0], level_token_ids, 0)  # (N,)
        t = ids.shape[1]
        for start in range(0, n, chunk):
            part = codes[start : start + chunk]
            c = part.shape[0]
            cache = copy.deepcopy(out.cache)
            cache.batch_repeat_interleave(c)
            step = model(
                input_ids=part[:, :-1], cache=cache, use_cache=True,
                attention_mask=torch.ones(c, t + levels - 1, dtype=torch.long, device=device),
                position_ids=(t + torch.arange(levels - 1, device=device)).expand(c, -1),
            )
            rest = sum(_code_logp(step.logits[:, lv - 1].float(), part[:, lv], level_token_ids, lv) for lv in range(1, levels))
            result[row, start : start + c] = first[start : start + c] + rest
    return result


def _code_logp(logits: Tensor, targets: Tensor, level_token_ids: Tensor | None, level: int) -> Tensor:
    """Log-probability of ``targets`` under ``logits`` (``(V,)`` or ``(N, V)``): over the vocabulary, or over
    ``level``'s code tokens when ``level_token_ids`` is given."""
    logp = logits.log_softmax(-1)
    if level_token_ids is not None:
        ids = level_token_ids[level].to(logits.device)
        logp = logp - torch.logsumexp(logp[..., ids[ids >= 0]], dim=-1, keepdim=True)
    return logp[targets] if logp.dim() == 1 else logp.gather(1, targets.unsqueeze(1)).squeeze(1)


def rank_exact(scores: Tensor, loc_ids: Tensor, top: int) -> Ranked:
    """Top ``top`` locations of :func:`exact_scores` (ties broken by position, i.e. stably)."""
    values, idx = scores.topk(min(top, scores.shape[1]), dim=1)
    return Ranked(loc_ids=loc_ids.to(scores.device)[idx], scores=values)


__all__ = ["CODE_SOFTMAXES", "Ranked", "beam_search", "exact_scores", "level_normalised", "prefill", "rank_exact"]
