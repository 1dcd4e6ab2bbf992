"""Line-level reading shared by the raw-text readers (TSMC2014, SNAP Gowalla).

Raw files are read as bytes and split into lines here, so that every defect a real download can
have (invalid UTF-8, NUL bytes, a truncated last line, a wrong number of fields) becomes a
quarantined row with its line number instead of a parser exception.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import polars as pl

from datamodules.errors import DataError

LINE_SCHEMA = {"line": pl.Int64(), "text": pl.String()}


def decode(raw: bytes, encoding: str) -> tuple[str, str]:
    """Bytes to text, deciding per file *and* per line; returns ``(text, encoding used)``.

    ``auto``: UTF-8 when the file decodes; Latin-1 when the file is consistently Latin-1 — no line
    holds valid non-ASCII UTF-8 and the lines with non-ASCII bytes all fail UTF-8 (the raw TSMC2014
    dumps: ``Caf\xe9``); otherwise (a UTF-8 file with ``Café`` written properly on some lines and a
    stray byte on others) UTF-8, and the lines that do not decode keep their line number and are
    quarantined (reason ``encoding``), so one stray byte cannot turn a whole file into Latin-1. ``utf-8`` decides per line only; any other codec (``data.encoding``) is taken as declared.
    """
    if encoding == "auto":
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
        non_ascii = [line for line in raw.split(b"\n") if not line.isascii()]
        invalid = 0
        for line in non_ascii:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
        if invalid == len(non_ascii):
            return raw.decode("latin-1"), "latin-1"
        encoding = "utf-8"
    # errors="replace" keeps line numbers aligned; lines that contained invalid bytes are recognised
    # by the replacement character and quarantined by split_fields.
    try:
        return raw.decode(encoding, errors="replace"), encoding
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a known text encoding (e.g. utf-8, latin-1, auto)") from None


def read_lines(path: Path, expected_format: str, encoding: str = "utf-8", info: dict | None = None,
               drop_duplicates: bool = False) -> tuple[pl.DataFrame, bool]:
    """Read a text file (plain or ``.gz``) into numbered lines.

    Args:
        path: The file.
        expected_format: One-line description of the format, used in error messages.
        encoding: ``utf-8``, ``auto`` or a declared codec (see :func:`decode`). The raw TSMC2014 files
            need ``auto`` or ``latin-1``: their category names (``Caf\xe9``) are Latin-1 encoded.
        info: Filled with ``encoding`` (the one used) and ``duplicate_lines`` (exact repeats of an
            earlier data line), for the data summary.
        drop_duplicates: Drop those repeats (they are counted either way).

    Returns:
        ``(lines, unterminated)``: a frame with ``line`` (1-based) and ``text``; blank lines are
        skipped. ``unterminated`` is True when the file does not end with a newline, so the last
        line may be truncated.

    Raises:
        DataError: if the file is missing, unreadable or holds no data.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Expected {expected_format}.")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc}). Expected {expected_format}.") from None
    if not raw.strip():
        raise DataError(f"{path}: the file is empty. Expected {expected_format}.")
    unterminated = not raw.endswith(b"\n")
    text, used = decode(raw, encoding)
    texts = text.split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    df = pl.DataFrame(
        {"line": pl.int_range(1, len(texts) + 1, eager=True), "text": pl.Series(texts, dtype=pl.String)}
    ).with_columns(pl.col("text").str.strip_suffix("\r"))
    df = df.filter(pl.col("text").str.strip_chars() != "")
    repeat = ~pl.col("text").is_first_distinct()
    n_dup = int(df.select(repeat.sum()).item())
    if drop_duplicates and n_dup:
        df = df.filter(~repeat)
    if info is not None:
        info.update(encoding=used, duplicate_lines=n_dup, duplicates_dropped=bool(drop_duplicates and n_dup))
    return df, unterminated


def split_fields(
    lines: pl.DataFrame, names: list[str], separator: str, unterminated: bool
) -> pl.DataFrame:
    """Split each line into named string fields and flag structural defects.

    Args:
        lines: Output of :func:`read_lines`.
        names: The expected field names, in order.
        separator: Field separator.
        unterminated: Whether the file's last line lacks its newline.

    Returns:
        ``lines`` plus one string column per name and a ``reason`` column (null for a
        structurally sound line).
    """
    n = len(names)
    last_line = lines["line"].max() if lines.height else -1
    parts = pl.col("text").str.split(separator)
    return lines.with_columns(
        *[parts.list.get(i, null_on_oob=True).str.strip_chars().alias(name) for i, name in enumerate(names)],
        reason=pl.when(pl.col("text").str.contains("\x00", literal=True))
        .then(pl.lit("NUL byte in line"))
        .when(pl.col("text").str.contains("\ufffd", literal=True))
        .then(pl.lit("encoding: not valid UTF-8 (invalid UTF-8)"))
        .when((parts.list.len() != n) & (pl.col("line") == last_line) & pl.lit(unterminated))
        .then(pl.lit("truncated last line"))
        .when(parts.list.len() != n)
        .then(pl.format(f"expected {n} fields separated by {separator!r}, got {{}}", parts.list.len()))
        .otherwise(pl.lit(None, dtype=pl.String)),
    )


def partition(df: pl.DataFrame, checks: list[tuple[pl.Expr, str]]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split rows into good and bad by ordered checks.

    Args:
        df: Frame with ``line``, ``text`` and ``reason`` (null = fine so far).
        checks: ``(is_bad, reason)`` pairs; the first failing check names the reason.

    Returns:
        ``(good, bad)``; ``bad`` has ``line``, ``reason`` and ``content``.
    """
    value_reason = pl.lit(None, dtype=pl.String)
    for is_bad, why in reversed(checks):
        value_reason = pl.when(is_bad.fill_null(True)).then(pl.lit(why)).otherwise(value_reason)
    # A structural reason (wrong field count, NUL byte) always wins over a value check.
    df = df.with_columns(reason=pl.coalesce(pl.col("reason"), value_reason))
    bad = df.filter(pl.col("reason").is_not_null()).select("line", "reason", content=pl.col("text"))
    good = df.filter(pl.col("reason").is_null()).drop("reason", "text")
    return good, bad
