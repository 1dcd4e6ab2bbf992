"""The trie of valid location codes, as tensors, for constrained decoding.

When the LLM generates a location it emits ``L`` code tokens, one per level. Only prefixes of codes
that some location has are allowed, so that every finished beam names a real location. The trie is
stored level by level as dense child tables, which turns each decoding step into one gather for the
whole batch of beams instead of a Python loop over them:

* ``node_children[l]`` — ``(num_nodes_l, K)``: the node at level ``l + 1`` reached from node ``n`` of
  level ``l`` by code ``c``, or ``-1``. Level 0 has the single root node ``0``; the nodes after the
  last level are the leaves.
* ``leaf_loc`` — ``(num_leaves,)``: the ``loc_id`` of each leaf.
* ``level_token_ids[l]`` — ``(K,)``: the LLM token id of code ``c`` at level ``l`` (``-1`` for a token
  that the tokenizer lacks; such codes must not be used by any location).

Memory is ``K * 8`` bytes per node: about 12 MB for 4 levels, ``K = 256`` and 6k locations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from location_tokenizers.codes import CodeTable, all_code_tokens, level_token


@runtime_checkable
class TokenConverter(Protocol):
    """Anything that maps token strings to ids like a Hugging Face tokenizer."""

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int | None]: ...  # noqa: D102


def lookup_token_ids(token_to_id: Mapping[str, int] | TokenConverter, tokens: list[str]) -> np.ndarray:
    """Token ids of ``tokens``, ``-1`` where the vocabulary lacks a token.

    Args:
        token_to_id: A ``dict`` token -> id, or an object with ``convert_tokens_to_ids`` (a HF
            tokenizer after ``add_tokens``).
        tokens: The token strings to look up.

    Returns:
        ``(len(tokens),)`` int64 array.
    """
    if isinstance(token_to_id, Mapping):
        raw: list[int | None] = [token_to_id.get(tok) for tok in tokens]
    elif hasattr(token_to_id, "convert_tokens_to_ids"):
        raw = list(token_to_id.convert_tokens_to_ids(list(tokens)))
        # HF tokenizers answer an unknown token with the unk id (or None when there is none); a code
        # token mapped to unk would silently make every code at that position look alike.
        unk_id = getattr(token_to_id, "unk_token_id", None)
        unk_tok = getattr(token_to_id, "unk_token", None)
        if unk_id is not None:
            raw = [None if (i == unk_id and tok != unk_tok) else i for tok, i in zip(tokens, raw)]
    else:
        raise TypeError(
            f"token_to_id must be a mapping or have convert_tokens_to_ids, got {type(token_to_id).__name__}"
        )
    return np.asarray([-1 if i is None else int(i) for i in raw], dtype=np.int64).reshape(len(tokens))


class CodeTrie:
    """Valid code prefixes of a :class:`CodeTable` as per-level child tables.

    Args:
        table: The codes; full codes must be distinct (a collision would make a leaf ambiguous).
        token_to_id: Token string -> LLM token id (``dict`` or HF tokenizer).
        vocab_size: Width of the masks, i.e. the LLM's logits size (it may exceed the tokenizer's
            length when the embedding matrix is padded). Default: the largest code token id + 1.

    Attributes:
        num_levels: ``L``.
        codebook_size: ``K``.
        vocab_size: Width of :meth:`allowed_mask`.
        node_children: ``L`` LongTensors, ``node_children[l]`` of shape ``(num_nodes_l, K)``.
        leaf_loc: ``(num_leaves,)`` LongTensor, the loc_id of each leaf.
        level_token_ids: ``L`` LongTensors of shape ``(K,)``.
        id_to_code: ``(vocab_size,)`` LongTensor, the code of a code token id (``-1`` otherwise).
        id_to_level: ``(vocab_size,)`` LongTensor, the level of a code token id (``-1`` otherwise).
    """

    def __init__(
        self,
        table: CodeTable,
        token_to_id: Mapping[str, int] | TokenConverter,
        vocab_size: int | None = None,
    ) -> None:
        self.num_levels = table.num_levels
        self.codebook_size = table.codebook_size
        num_levels, k = self.num_levels, self.codebook_size

        ids = lookup_token_ids(token_to_id, all_code_tokens(num_levels, k)).reshape(num_levels, k)
        self._check_token_ids(table, ids)
        known = ids[ids >= 0]
        max_id = int(known.max()) if known.size else -1
        if vocab_size is None:
            vocab_size = max_id + 1
        if vocab_size <= max_id:
            raise ValueError(f"vocab_size={vocab_size} but a code token has id {max_id}")
        self.vocab_size = int(vocab_size)

        self.level_token_ids = [torch.from_numpy(ids[level].copy()) for level in range(num_levels)]
        id_to_code = np.full(self.vocab_size, -1, dtype=np.int64)
        id_to_level = np.full(self.vocab_size, -1, dtype=np.int64)
        for level in range(num_levels):
            present = np.nonzero(ids[level] >= 0)[0]
            id_to_code[ids[level, present]] = present
            id_to_level[ids[level, present]] = level
        self.id_to_code = torch.from_numpy(id_to_code)
        self.id_to_level = torch.from_numpy(id_to_level)
        # Columns of the mask that a level can touch, and which codes they hold: precomputed so that
        # allowed_mask is a gather plus one scatter.
        self._mask_cols = [torch.from_numpy(np.nonzero(ids[level] >= 0)[0]) for level in range(num_levels)]

        self.node_children, self.leaf_loc = self._build_nodes(table)

    # ------------------------------------------------------------------------------ building
    @staticmethod
    def _check_token_ids(table: CodeTable, ids: np.ndarray) -> None:
        """Every used code needs a token id, and distinct tokens need distinct ids."""
        missing = [
            level_token(level, int(code))
            for level in range(table.num_levels)
            for code in np.unique(table.codes[:, level])
            if ids[level, code] < 0
        ]
        if missing:
            raise ValueError(
                f"{len(missing)} code tokens used by the table are not in the vocabulary (e.g. {missing[:5]}); "
                "add all_code_tokens(L, K) to the tokenizer first"
            )
        known = ids[ids >= 0]
        if np.unique(known).size != known.size:
            raise ValueError("different code tokens share a token id; the vocabulary mapping is inconsistent")

    def _build_nodes(self, table: CodeTable) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Number the distinct prefixes level by level; the rows may come in any order."""
        k = self.codebook_size
        node = np.zeros(len(table), dtype=np.int64)  # every location starts at the root
        num_nodes = 1
        children: list[torch.Tensor] = []
        for level in range(self.num_levels):
            # (parent node, code) identifies a child prefix; np.unique numbers them deterministically.
            key = node * k + table.codes[:, level]
            uniq, inverse = np.unique(key, return_inverse=True)
            table_l = np.full((num_nodes, k), -1, dtype=np.int64)
            table_l[uniq // k, uniq % k] = np.arange(uniq.size, dtype=np.int64)
            children.append(torch.from_numpy(table_l))
            node = inverse.reshape(-1).astype(np.int64)
            num_nodes = int(uniq.size)
        if num_nodes != len(table):
            raise ValueError(
                f"{len(table) - num_nodes} locations share a full code with another one; "
                "constrained decoding needs collision-free codes"
            )
        leaf_loc = np.empty(num_nodes, dtype=np.int64)
        leaf_loc[node] = table.loc_ids
        return children, torch.from_numpy(leaf_loc)

    # ---------------------------------------------------------------------------- properties
    @property
    def num_nodes(self) -> list[int]:
        """Nodes per level, ``num_nodes[0] == 1`` (the root)."""
        return [int(t.shape[0]) for t in self.node_children]

    @property
    def num_leaves(self) -> int:
        """Number of complete codes (= locations)."""
        return int(self.leaf_loc.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.leaf_loc.device

    def to(self, device: torch.device | str) -> CodeTrie:
        """Move every tensor to ``device`` (in place) and return ``self``."""
        self.node_children = [t.to(device) for t in self.node_children]
        self.level_token_ids = [t.to(device) for t in self.level_token_ids]
        self._mask_cols = [t.to(device) for t in self._mask_cols]
        self.leaf_loc = self.leaf_loc.to(device)
        self.id_to_code = self.id_to_code.to(device)
        self.id_to_level = self.id_to_level.to(device)
        return self

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise ValueError(f"level must be in [0, {self.num_levels}), got {level}")

    # ---------------------------------------------------------------------------- batched API
    def root(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(batch,)`` root nodes (zeros) to start decoding from."""
        return torch.zeros(batch, dtype=torch.long, device=self.device if device is None else device)

    def _children(self, node: torch.Tensor, level: int) -> torch.Tensor:
        """``(B, K)`` child rows of ``node``; a dead node (``-1``) has no children."""
        self._check_level(level)
        node = node.to(self.device, torch.long)
        rows = self.node_children[level][node.clamp(min=0)]
        return torch.where((node >= 0).unsqueeze(1), rows, torch.full_like(rows, -1))

    def allowed_mask(self, node: torch.Tensor, level: int) -> torch.Tensor:
        """Which token ids may come next.

        Args:
            node: ``(B,)`` current nodes at ``level`` (``-1`` for a dead beam: nothing allowed).
            level: The level whose code is generated next, ``0 <= level < L``.

        Returns:
            ``(B, vocab_size)`` bool, True exactly at the token ids of valid next codes.
        """
        valid = self._children(node, level) >= 0
        cols = self._mask_cols[level]
        mask = torch.zeros(valid.shape[0], self.vocab_size, dtype=torch.bool, device=self.device)
        mask[:, self.level_token_ids[level][cols]] = valid[:, cols]
        return mask

    def advance(self, node: torch.Tensor, level: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Follow one generated token.

        Args:
            node: ``(B,)`` current nodes at ``level`` (``-1`` stays ``-1``).
            level: The level of the generated code.
            token_ids: ``(B,)`` generated token ids (any id, in or out of the vocabulary).

        Returns:
            ``(B,)`` nodes at ``level + 1`` (leaves after the last level), ``-1`` where the token is
            not a valid continuation.
        """
        rows = self._children(node, level)
        tok = token_ids.to(self.device, torch.long)
        if self.vocab_size == 0:  # no code tokens at all: nothing is ever valid
            return torch.full_like(tok, -1)
        in_vocab = (tok >= 0) & (tok < self.vocab_size)
        safe = tok.clamp(0, self.vocab_size - 1)
        code = self.id_to_code[safe]
        ok = in_vocab & (self.id_to_level[safe] == level)
        child = rows.gather(1, code.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where(ok, child, torch.full_like(child, -1))

    def leaf_to_loc(self, node: torch.Tensor) -> torch.Tensor:
        """``loc_id`` of each leaf node (same shape as ``node``; ``-1`` stays ``-1``)."""
        node = node.to(self.device, torch.long)
        if self.num_leaves == 0:
            return torch.full_like(node, -1)
        loc = self.leaf_loc[node.clamp(min=0)]
        return torch.where(node >= 0, loc, torch.full_like(loc, -1))

    def decode_batch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` code token ids -> ``(B,)`` loc_ids, ``-1`` for an invalid code."""
        if token_ids.ndim != 2 or token_ids.shape[1] != self.num_levels:
            raise ValueError(f"token_ids must have shape (B, {self.num_levels}), got {tuple(token_ids.shape)}")
        node = self.root(token_ids.shape[0])
        for level in range(self.num_levels):  # a loop over levels, never over rows
            node = self.advance(node, level, token_ids[:, level])
        return self.leaf_to_loc(node)

    def decode(self, token_ids: Sequence[int]) -> int | None:
        """The ``loc_id`` of one full code given as token ids, or ``None`` if it is not valid."""
        if len(token_ids) != self.num_levels:
            return None
        loc = int(self.decode_batch(torch.as_tensor([list(token_ids)], dtype=torch.long))[0])
        return None if loc < 0 else loc

    def prefix_allowed_tokens_fn(self, prompt_length: int):
        """A ``prefix_allowed_tokens_fn`` for Hugging Face ``generate``: after ``prompt_length`` prompt
        tokens (left padding included), only token ids that extend a valid code; once a code is complete,
        only the code's own end is left, so ``max_new_tokens=num_levels`` ends the answer.

        Slower than :func:`lightning_modules.constrained_decoding.beam_search` (a Python call per beam and
        step) but needs nothing beyond ``transformers``: the README's example uses it.
        """
        children = [t.cpu() for t in self.node_children]
        level_ids = [t.cpu() for t in self.level_token_ids]
        id_to_code = self.id_to_code.cpu()

        def allowed(_batch_id: int, sent: torch.Tensor) -> list[int]:
            node, generated = 0, sent[prompt_length:].tolist()
            for level, token in enumerate(generated[: self.num_levels]):
                code = int(id_to_code[token]) if 0 <= token < len(id_to_code) else -1
                node = int(children[level][node, code]) if code >= 0 and node >= 0 else -1
            level = len(generated)
            if node < 0 or level >= self.num_levels:
                return []  # a finished or impossible prefix: generate stops at max_new_tokens
            codes = torch.nonzero(children[level][node] >= 0).flatten()
            return level_ids[level][codes].tolist()

        return allowed

    # ------------------------------------------------------------------------------ inspection
    def valid_prefixes(self) -> dict[tuple[int, ...], tuple[int, ...]]:
        """Every prefix in the trie (length ``0..L-1``) -> its sorted valid next codes.

        Read back from the tensors (not from the table), so tests can compare it with a brute-force
        enumeration of the table's codes.
        """
        out: dict[tuple[int, ...], tuple[int, ...]] = {}
        frontier: list[tuple[tuple[int, ...], int]] = [((), 0)]
        for level in range(self.num_levels):
            table_l = self.node_children[level].cpu().numpy()
            nxt: list[tuple[tuple[int, ...], int]] = []
            for prefix, node in frontier:
                codes = np.nonzero(table_l[node] >= 0)[0]
                out[prefix] = tuple(int(c) for c in codes)
                nxt.extend((prefix + (int(c),), int(table_l[node, c])) for c in codes)
            frontier = nxt
        return out


__all__: list[str] = ["CodeTrie", "TokenConverter", "lookup_token_ids"]
