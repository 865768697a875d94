"""Errors raised by the MIMIC-IT readers, and the bookkeeping of records skipped with `skip_bad_records=True`."""

from __future__ import annotations

import os
from collections import Counter

from transformers.utils import logging

logger = logging.get_logger(__name__)


class DataError(ValueError):
    """A problem with one record of one data file. The message starts with the file and the record id, so it can be
    found and fixed: `path/to/LA_instructions.json: record 'LA_00_0001': field 'answer' is empty`."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, record_id: str | None = None):
        self.file = None if file is None else str(file)
        self.record_id = record_id
        self.reason = message
        where = self.file if self.file is not None else "<unknown file>"
        if record_id is not None:
            where = f"{where}: record {record_id!r}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # keep file/record_id when the error crosses a DataLoader worker boundary
        return (type(self), (self.reason, self.file, self.record_id))


class BadRecords:
    """What to do with a bad record: raise its `DataError` (default) or, with `skip=True`, log it and count it.

    Counts are kept per file; `summary()` gives them for the end-of-run report. Nothing is dropped without a log line.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: Counter[str] = Counter()

    def handle(self, error: DataError) -> None:
        if not self.skip:
            raise error
        self.counts[error.file or "<unknown file>"] += 1
        logger.warning(f"skipping bad record: {error}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no bad records"
        parts = ", ".join(f"{file}: {count}" for file, count in sorted(self.counts.items()))
        return f"{self.total} bad records skipped ({parts})"
