"""User-facing data errors and the quarantine of malformed input rows.

Bad input never becomes a traceback or a silent drop: a malformed row goes to the quarantine with
its file, line number and reason, and is counted in the data summary. When too many rows of one
file are bad, the run stops with a :class:`DataError` naming the file and its first bad lines.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(),
    "line": pl.Int64(),
    "reason": pl.String(),
    "content": pl.String(),
}


class DataError(Exception):
    """An input problem the user can fix; ``run.py`` prints it without a traceback."""


@dataclass
class Quarantine:
    """Collects malformed rows per input file and enforces the bad-row budget.

    Attributes:
        max_bad_fraction: Largest share of bad rows tolerated per file before the run stops.
        frames: The quarantined rows, one frame per :meth:`add` call.
        totals: Rows read per file (good + bad), the denominator of the bad share.
    """

    max_bad_fraction: float = 0.01
    frames: list[pl.DataFrame] = field(default_factory=list)
    totals: Counter = field(default_factory=Counter)
    # Per file: the text encoding used and the exact duplicate lines found (see note_file).
    files: dict = field(default_factory=dict)

    def note_file(self, file: str | Path, **facts) -> None:
        """Record facts about an input file for the summary (``encoding``, ``duplicate_lines``, ...)."""
        self.files.setdefault(str(file), {}).update(facts)

    def bad_lines(self, file: str | Path) -> int:
        """Distinct lines of ``file`` with at least one quarantined entry (a release line may hold several bad visits)."""
        frames = [f.filter(pl.col("file") == str(file)) for f in self.frames]
        return int(pl.concat(frames)["line"].n_unique()) if frames else 0

    def add(self, bad: pl.DataFrame, file: str | Path, total_rows: int) -> None:
        """Record the bad rows of one file and check the budget.

        Args:
            bad: Frame with columns ``line`` (1-based), ``reason`` and ``content``.
            file: The input file the rows come from.
            total_rows: Number of data rows read from that file (good and bad).

        Raises:
            DataError: if the share of bad rows of this file exceeds ``max_bad_fraction``.
        """
        file = str(file)
        self.totals[file] += total_rows
        if bad.height:
            bad = bad.select(
                pl.lit(file).alias("file"),
                pl.col("line").cast(pl.Int64),
                pl.col("reason").cast(pl.String),
                # Keep the evidence short and printable: NUL bytes and long lines do not help.
                pl.col("content").cast(pl.String).str.replace_all("\x00", "\\0", literal=True)
                .str.slice(0, 200),
            )
            self.frames.append(bad)
        n_bad = self.bad_lines(file)  # records of the file (lines), not visits: 4 % bad lines never pass as 0.8 %
        if self.totals[file] and n_bad / self.totals[file] > self.max_bad_fraction:
            first = self.table().filter(pl.col("file") == file).sort("line").head(5)
            lines = "\n".join(
                f"  line {r['line']}: {r['reason']}: {r['content']!r}" for r in first.iter_rows(named=True)
            )
            raise DataError(
                f"{file}: {n_bad} of {self.totals[file]} lines are malformed "
                f"({n_bad / self.totals[file]:.1%} > data.max_bad_fraction={self.max_bad_fraction:.1%}).\n"
                f"First bad lines:\n{lines}"
            )

    def table(self) -> pl.DataFrame:
        """All quarantined rows as one frame (``file, line, reason, content``)."""
        if not self.frames:
            return pl.DataFrame(schema=QUARANTINE_SCHEMA)
        return pl.concat(self.frames)

    def count(self, file: str | Path | None = None) -> int:
        """Number of quarantined rows, in total or for one file."""
        if file is None:
            return sum(f.height for f in self.frames)
        return sum(f.filter(pl.col("file") == str(file)).height for f in self.frames)

    def summary(self) -> dict:
        """Counts per file and reason, for ``summary.json``."""
        table = self.table()
        per_reason = (
            table.group_by("file", "reason").len().sort("file", "reason").iter_rows()
            if table.height
            else []
        )
        by_file: dict[str, dict] = {f: {"rows": n, "quarantined": 0, "reasons": {}} for f, n in self.totals.items()}
        for file, reason, n in per_reason:
            entry = by_file.setdefault(file, {"rows": 0, "quarantined": 0, "reasons": {}})
            entry["reasons"][reason] = n
            entry["quarantined"] += n
        for file, entry in by_file.items():
            # rows = data lines read; bad_lines = lines with a problem; quarantined = entries (visits or lines).
            entry["bad_lines"] = self.bad_lines(file)
            entry.update(self.files.get(file, {}))
        return {"total": self.count(), "files": by_file}


def require_timezone(name: str, setting: str) -> str:
    """Check an IANA time-zone name up front, so a typo is a message and not a Polars traceback.

    Args:
        name: The zone, e.g. ``America/New_York``.
        setting: The config key that holds it (for the message).

    Returns:
        ``name``.

    Raises:
        DataError: if the zone is unknown.
    """
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise DataError(f"{setting}={name!r} is not a known IANA time zone (e.g. America/New_York, Asia/Tokyo)") from None
    return str(name)
