"""Discrete location codes and their token strings.

Every location (an integer ``loc_id``) is described by ``L`` codes, one per quantisation level,
each in ``[0, K)``. Level ``l`` is written with the letter ``chr(ord('a') + l)``, so the code
``(12, 3, 40, 7)`` becomes the tokens ``<a_12> <b_3> <c_40> <d_7>`` and the joined string
``<a_12><b_3><c_40><d_7>`` that appears in prompts. These tokens are added to the LLM tokenizer
(:func:`all_code_tokens`) and the valid combinations constrain decoding (:mod:`.trie`).

:class:`CodeTable` is the in-memory form of an assignment. It reads and writes the official
QT-Mob release format (``index_<model>.json``: ``{"<loc id>": ["<a_24>", "<b_19>", ...]}``) and a
parquet file of our own; every file is written atomically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from datamodules.artifacts import atomic_file

#: Levels are lettered ``a``..``z``; beyond that the token strings would be ambiguous.
MAX_LEVELS = 26

# Canonical form only (no leading zeros, no sign, no spaces) so that string -> code -> string is the
# identity and two spellings can never map to one code.
_TOKEN_RE = re.compile(r"<([a-z])_(0|[1-9][0-9]*)>")
_CODE_COLUMN_RE = re.compile(r"c(0|[1-9][0-9]*)")
_PARQUET_K_KEY = "qtmob.codebook_size"


def _level_letter(level: int) -> str:
    if not 0 <= level < MAX_LEVELS:
        raise ValueError(f"level must be in [0, {MAX_LEVELS}), got {level}")
    return chr(ord("a") + level)


def level_token(level: int, code: int) -> str:
    """The token string of one code.

    Args:
        level: Quantisation level, 0-based (0 -> ``a``).
        code: Code index at that level (non-negative).

    Returns:
        The token, e.g. ``level_token(2, 40) == "<c_40>"``.

    Raises:
        ValueError: If the level is outside ``[0, 26)`` or the code is negative.
    """
    if code < 0:
        raise ValueError(f"code must be non-negative, got {code}")
    return f"<{_level_letter(level)}_{int(code)}>"


def parse_token(tok: str) -> tuple[int, int]:
    """Parse one token string.

    Args:
        tok: A token such as ``"<b_19>"``.

    Returns:
        ``(level, code)``, e.g. ``(1, 19)``.

    Raises:
        ValueError: If ``tok`` is not exactly one canonical code token.
    """
    if not isinstance(tok, str):
        raise ValueError(f"a code token must be a string, got {type(tok).__name__}: {tok!r}")
    match = _TOKEN_RE.fullmatch(tok)
    if match is None:
        raise ValueError(
            f"malformed code token {tok!r}: expected '<letter_code>' such as '<a_12>' "
            "(lower-case level letter, non-negative code without leading zeros)"
        )
    return ord(match.group(1)) - ord("a"), int(match.group(2))


def codes_to_strings(codes: np.ndarray) -> list[str]:
    """Join the tokens of each row of a code array.

    Args:
        codes: Integer array of shape ``(N, L)``.

    Returns:
        ``N`` strings such as ``"<a_12><b_3><c_40><d_7>"``.

    Raises:
        ValueError: If ``codes`` is not a 2-D non-negative integer array.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (N, L), got {codes.shape}")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and codes.min() < 0:
        raise ValueError("codes must be non-negative")
    num_levels = codes.shape[1]
    prefixes = [f"<{_level_letter(level)}_" for level in range(num_levels)]
    # tolist() gives Python ints once, far cheaper than formatting numpy scalars one by one.
    return ["".join(f"{p}{c}>" for p, c in zip(prefixes, row)) for row in codes.tolist()]


def string_to_codes(s: str) -> tuple[int, ...]:
    """Parse a joined code string (inverse of :func:`codes_to_strings` for one row).

    Args:
        s: A string such as ``"<a_12><b_3><c_40><d_7>"``.

    Returns:
        The codes, e.g. ``(12, 3, 40, 7)``.

    Raises:
        ValueError: If the string is empty, contains anything but code tokens, or its levels are
            not ``a, b, c, ...`` in order.
    """
    if not isinstance(s, str) or not s:
        raise ValueError(f"expected a non-empty code string such as '<a_12><b_3>', got {s!r}")
    codes: list[int] = []
    pos = 0
    # Scan token by token (rather than findall) so stray characters between tokens are an error.
    while pos < len(s):
        match = _TOKEN_RE.match(s, pos)
        if match is None:
            raise ValueError(f"malformed code string {s!r}: no valid code token at position {pos}")
        level, code = ord(match.group(1)) - ord("a"), int(match.group(2))
        if level != len(codes):
            raise ValueError(
                f"malformed code string {s!r}: token {match.group(0)!r} has level "
                f"{match.group(1)!r} where level {_level_letter(len(codes))!r} was expected"
            )
        codes.append(code)
        pos = match.end()
    return tuple(codes)


def all_code_tokens(num_levels: int, codebook_size: int) -> list[str]:
    """Every possible code token, level-major (``<a_0>..<a_{K-1}>, <b_0>, ...``).

    This is the list added to the LLM tokenizer, so its order fixes the new token ids.

    Args:
        num_levels: ``L``.
        codebook_size: ``K``.

    Returns:
        ``L * K`` token strings.
    """
    if num_levels < 0 or codebook_size < 0:
        raise ValueError(f"num_levels and codebook_size must be non-negative, got {num_levels}, {codebook_size}")
    return [level_token(level, code) for level in range(num_levels) for code in range(codebook_size)]


@dataclass(eq=False)  # field-wise == on numpy arrays would raise; compare arrays explicitly
class CodeTable:
    """Codes of a set of locations.

    Attributes:
        loc_ids: ``(N,)`` int64, distinct location ids.
        codes: ``(N, L)`` int64, row ``i`` is the code of ``loc_ids[i]``, each entry in ``[0, K)``.
        codebook_size: ``K``, the number of codes per level.
    """

    loc_ids: np.ndarray
    codes: np.ndarray
    codebook_size: int

    def __post_init__(self) -> None:
        self.loc_ids = np.asarray(self.loc_ids)
        self.codes = np.asarray(self.codes)
        if self.loc_ids.ndim != 1:
            raise ValueError(f"loc_ids must have shape (N,), got {self.loc_ids.shape}")
        if self.codes.ndim != 2 or self.codes.shape[0] != self.loc_ids.shape[0]:
            raise ValueError(f"codes must have shape (N={self.loc_ids.shape[0]}, L), got {self.codes.shape}")
        for name, arr in (("loc_ids", self.loc_ids), ("codes", self.codes)):
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
        self.loc_ids = self.loc_ids.astype(np.int64, copy=False)
        self.codes = self.codes.astype(np.int64, copy=False)
        self.codebook_size = int(self.codebook_size)
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {self.codebook_size}")
        if not 1 <= self.codes.shape[1] <= MAX_LEVELS:
            raise ValueError(f"the number of levels must be in [1, {MAX_LEVELS}], got {self.codes.shape[1]}")
        if self.codes.size and (self.codes.min() < 0 or self.codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), found [{self.codes.min()}, {self.codes.max()}]"
            )
        # A location with two codes would make both the prompts and the decoded answer ambiguous.
        if np.unique(self.loc_ids).size != self.loc_ids.size:
            raise ValueError("loc_ids must be distinct")

    def __len__(self) -> int:
        return int(self.loc_ids.shape[0])

    @property
    def num_levels(self) -> int:
        """``L``, the number of codes per location."""
        return int(self.codes.shape[1])

    # ----------------------------------------------------------------------------------- frames
    def to_frame(self) -> pl.DataFrame:
        """Columns ``loc_id``, ``c0``..``c{L-1}`` (Int64) and ``code`` (the joined token string)."""
        columns: dict[str, Any] = {"loc_id": pl.Series("loc_id", self.loc_ids, dtype=pl.Int64)}
        for level in range(self.num_levels):
            columns[f"c{level}"] = pl.Series(f"c{level}", self.codes[:, level], dtype=pl.Int64)
        columns["code"] = pl.Series("code", codes_to_strings(self.codes), dtype=pl.String)
        return pl.DataFrame(columns)

    @classmethod
    def from_frame(cls, df: pl.DataFrame, codebook_size: int | None = None) -> CodeTable:
        """Inverse of :meth:`to_frame`.

        Args:
            df: A frame with ``loc_id`` and either ``c0``..``c{L-1}`` or only ``code`` (joined
                strings). When both are present the integer columns are used and must agree with
                ``code``.
            codebook_size: ``K``; inferred as the largest code + 1 when ``None``.

        Returns:
            The table, rows in frame order.
        """
        if "loc_id" not in df.columns:
            raise ValueError(f"frame has no 'loc_id' column (columns: {df.columns})")
        level_cols = sorted(
            (int(m.group(1)), c) for c in df.columns if (m := _CODE_COLUMN_RE.fullmatch(c)) is not None
        )
        if level_cols:
            if [lvl for lvl, _ in level_cols] != list(range(len(level_cols))):
                raise ValueError(f"code columns must be c0..c{{L-1}} without gaps, got {[c for _, c in level_cols]}")
            code_frame = df.select([c for _, c in level_cols])
            # to_numpy would turn nulls into NaN and astype into garbage integers.
            if any(code_frame.null_count().row(0)):
                raise ValueError("code columns c0.. contain nulls")
            codes = code_frame.to_numpy().astype(np.int64).reshape(df.height, len(level_cols))
            if "code" in df.columns and codes_to_strings(codes) != df["code"].to_list():
                raise ValueError("columns c0.. and 'code' disagree")
        elif "code" in df.columns:
            codes = _rows_to_array([string_to_codes(s) for s in df["code"].to_list()])
        else:
            raise ValueError(f"frame has neither c0.. columns nor a 'code' column (columns: {df.columns})")
        return cls(df["loc_id"].to_numpy().astype(np.int64), codes, _infer_k(codes, codebook_size))

    def strings(self) -> pl.DataFrame:
        """Columns ``loc_id`` and ``code`` (joined token string), ready for rendering prompts."""
        return self.to_frame().select("loc_id", "code")

    def tokens(self) -> list[str]:
        """The distinct tokens used by this table, level-major and by code within a level."""
        return [
            level_token(level, int(code))
            for level in range(self.num_levels)
            for code in np.unique(self.codes[:, level])
        ]

    # ------------------------------------------------------------------------------- collisions
    def collisions(self) -> int:
        """How many locations share their full code with an earlier location (``N - #distinct``)."""
        if len(self) == 0:
            return 0
        return len(self) - int(np.unique(self.codes, axis=0).shape[0])

    def collision_rate(self) -> float:
        """:meth:`collisions` divided by the number of locations (0.0 for an empty table)."""
        return self.collisions() / len(self) if len(self) else 0.0

    # ------------------------------------------------------------------------------------ files
    def to_index_json(self, path: str | Path) -> None:
        """Write the release format ``{"<loc id>": ["<a_24>", "<b_19>", ...], ...}`` atomically."""
        letters = [f"<{_level_letter(level)}_" for level in range(self.num_levels)]
        index = {
            str(loc): [f"{p}{c}>" for p, c in zip(letters, row)]
            for loc, row in zip(self.loc_ids.tolist(), self.codes.tolist())
        }
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(index), encoding="utf-8")

    @classmethod
    def from_index_json(cls, path: str | Path, codebook_size: int | None = None) -> CodeTable:
        """Read the release format (see :meth:`to_index_json`).

        Args:
            path: The ``index_*.json`` file.
            codebook_size: ``K``; inferred as the largest code + 1 when ``None`` (which
                under-estimates ``K`` if the top codes happen to be unused).

        Returns:
            The table, rows in file order.

        Raises:
            ValueError: On a non-integer key, a malformed token, levels out of order or rows of
                different lengths.
        """
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object mapping loc id -> tokens")
        loc_ids: list[int] = []
        rows: list[tuple[int, ...]] = []
        for key, toks in raw.items():
            try:
                loc_ids.append(int(key))
            except ValueError:
                raise ValueError(f"{path}: key {key!r} is not an integer location id") from None
            if not isinstance(toks, list) or not toks:
                raise ValueError(f"{path}: location {key}: expected a non-empty list of tokens, got {toks!r}")
            try:
                # Joining reuses the order check of string_to_codes; a token that is itself two tokens
                # ("<a_1><b_2>") is caught by the length check below.
                rows.append(string_to_codes("".join(toks)))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}: location {key}: {exc}") from None
            if len(rows[-1]) != len(toks):
                raise ValueError(f"{path}: location {key}: each list item must be exactly one token, got {toks!r}")
        codes = _rows_to_array(rows, where=str(path))
        return cls(np.asarray(loc_ids, dtype=np.int64), codes, _infer_k(codes, codebook_size))

    def write_parquet(self, path: str | Path) -> None:
        """Write :meth:`to_frame` to parquet atomically; ``K`` travels in the file's metadata."""
        with atomic_file(path) as tmp:
            self.to_frame().write_parquet(tmp, metadata={_PARQUET_K_KEY: str(self.codebook_size)})

    @classmethod
    def read_parquet(cls, path: str | Path) -> CodeTable:
        """Inverse of :meth:`write_parquet` (``K`` is inferred if the metadata lacks it)."""
        meta = pl.read_parquet_metadata(path)
        k = int(meta[_PARQUET_K_KEY]) if _PARQUET_K_KEY in meta else None
        return cls.from_frame(pl.read_parquet(path), codebook_size=k)


def _infer_k(codes: np.ndarray, codebook_size: int | None) -> int:
    if codebook_size is not None:
        return int(codebook_size)
    return int(codes.max()) + 1 if codes.size else 1


def _rows_to_array(rows: list[tuple[int, ...]], where: str = "table") -> np.ndarray:
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(f"{where}: locations have codes of different lengths {sorted(lengths)}")
    if not rows:
        raise ValueError(f"{where}: no locations, so the number of levels is unknown")
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)


__all__: list[str] = [
    "MAX_LEVELS",
    "CodeTable",
    "all_code_tokens",
    "codes_to_strings",
    "level_token",
    "parse_token",
    "string_to_codes",
]
