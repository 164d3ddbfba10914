"""Loading assertion files into a dataset: one load is one transaction at one system time.

Files are identified by the SHA-256 of their decompressed bytes; a file already in the dataset's ledger
is skipped, so loading it again changes nothing. Bad rows are quarantined with file, line and reason;
a file that cannot be read at all stops the load before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from chronolake.batch_compat.readers import RawRecord, SourceFile, raw_text, read_records
from chronolake.iceberg.algebra import Key, KeyState, KeyTransaction
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.iceberg.rows import RowBuilder
from chronolake.iceberg.table import BitemporalTable, quarantine_schema
from chronolake.iceberg.temporal import format_micros

ALREADY_LOADED = "already loaded"
REPEATED = "repeated in this load"
LOADED = "loaded"
#: What applying a record returns when it was a replay of an event already applied.
DUPLICATE = "duplicate"


@dataclass
class FileReport:
    path: str
    sha256: str
    status: str
    rows: int = 0
    applied: int = 0
    quarantined: int = 0
    duplicates: int = 0
    loaded_at: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "status": self.status,
            "rows": self.rows,
            "applied": self.applied,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "loaded_at": None if self.loaded_at is None else format_micros(self.loaded_at),
        }


@dataclass
class LoadReport:
    dataset: str
    system_time: int | None
    files: list[FileReport] = field(default_factory=list)
    versions_opened: int = 0
    versions_closed: int = 0
    seconds: float = 0.0

    @property
    def applied(self) -> int:
        return sum(f.applied for f in self.files)

    @property
    def quarantined(self) -> int:
        return sum(f.quarantined for f in self.files)

    @property
    def duplicates(self) -> int:
        return sum(f.duplicates for f in self.files)

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "system_time": None if self.system_time is None else format_micros(self.system_time),
            "applied": self.applied,
            "quarantined": self.quarantined,
            "duplicates": self.duplicates,
            "rows": self.rows,
            "versions_opened": self.versions_opened,
            "versions_closed": self.versions_closed,
            "seconds": round(self.seconds, 3),
            "files": [f.to_json() for f in self.files],
        }


class _Phases:
    """Progress on stderr for long loads (hidden when stderr is not a terminal or when asked)."""

    def __init__(self, show: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not show,
            transient=True,
        )

    def __enter__(self) -> _Phases:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)  # type: ignore[arg-type]

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)


def load_files(
    table: BitemporalTable,
    paths: Sequence[str | Path],
    *,
    show_progress: bool = False,
) -> LoadReport:
    """Load files (in the order given) as one transaction; returns what happened to each file."""
    started = time.perf_counter()
    spec = table.spec
    sources = [SourceFile.detect(p) for p in paths]
    report = LoadReport(spec.name, None)

    with _Phases(show_progress) as phases:
        hashes = [s.sha256(phases.phase(f"hashing {s.path.name}", s.size)) for s in sources]
        ledger = table.loaded_files(hashes)
        to_load: list[tuple[SourceFile, FileReport]] = []
        seen: set[str] = set()
        for source, sha in zip(sources, hashes):
            file_report = FileReport(str(source.path), sha, LOADED)
            if sha in ledger:
                file_report.status, file_report.loaded_at = ALREADY_LOADED, ledger[sha]
            elif sha in seen:
                file_report.status = REPEATED
            else:
                to_load.append((source, file_report))
            seen.add(sha)
            report.files.append(file_report)
        if not to_load:
            report.seconds = time.perf_counter() - started
            return report

        t = table.next_system_time()
        parser = AssertionParser(spec)
        states: dict[Key, KeyState] = {}
        if table.table.current_snapshot() is not None:
            states = table.load_state(sorted(_keys(to_load, parser, phases), key=repr))

        transactions: dict[Key, KeyTransaction] = {}
        quarantine: list[tuple[str, str, int, str, str | None]] = []
        for source, file_report in to_load:
            advance = phases.phase(f"loading {source.path.name}", source.size)
            for batch in read_records(source, spec, advance):
                file_report.rows += len(batch)
                for raw in batch:
                    reason = _apply(raw, parser, states, transactions, t)
                    if reason is DUPLICATE:
                        file_report.duplicates += 1
                    elif reason is not None:
                        text = raw.raw if raw.record is None else raw_text(raw.record)
                        quarantine.append((str(source.path), file_report.sha256, raw.line, reason, text))
                        file_report.quarantined += 1
            file_report.applied = file_report.rows - file_report.quarantined - file_report.duplicates

        builder = RowBuilder(spec)
        for key, transaction in transactions.items():
            change = transaction.finish()
            report.versions_opened += len(change.opened)
            report.versions_closed += len(change.closed)
            builder.add_change(key, change, t)
        for _, file_report in to_load:
            builder.add_file(file_report.sha256, t)
            file_report.loaded_at = t
        table.commit(builder, t, "load", _quarantine_table(quarantine, t))
    report.system_time = t
    report.seconds = time.perf_counter() - started
    return report


def _apply(
    raw: RawRecord,
    parser: AssertionParser,
    states: dict[Key, KeyState],
    transactions: dict[Key, KeyTransaction],
    t: int,
) -> str | None:
    if raw.record is None:
        return raw.problem or "unreadable row"
    try:
        assertion = parser.parse(raw.record)
    except InvalidAssertion as error:
        return str(error)
    transaction = transactions.get(assertion.key)
    if transaction is None:
        state = states.pop(assertion.key, None) or KeyState()
        transaction = transactions[assertion.key] = KeyTransaction(state, t)
    before = transaction.duplicates
    reason = transaction.apply(assertion)
    if reason is None and transaction.duplicates != before:
        return DUPLICATE
    return reason


def _keys(to_load: list[tuple[SourceFile, FileReport]], parser: AssertionParser, phases: _Phases) -> set[Key]:
    keys: set[Key] = set()
    for source, _ in to_load:
        advance = phases.phase(f"reading keys of {source.path.name}", source.size)
        for batch in read_records(source, parser.spec, advance):
            for raw in batch:
                if raw.record is not None:
                    try:
                        keys.add(parser.parse_key(raw.record))
                    except InvalidAssertion:
                        pass
    return keys


def _quarantine_table(rows: list[tuple[str, str, int, str, str | None]], t: int) -> pa.Table:
    schema = quarantine_schema()
    if not rows:
        return schema.empty_table()
    source, sha, line, reason, raw = (list(c) for c in zip(*rows))
    return pa.table(
        {
            "source": source,
            "source_sha256": sha,
            "line": line,
            "reason": reason,
            "raw": raw,
            "system_time": pa.array([t] * len(rows), pa.int64()).cast(schema.field("system_time").type),
        },
        schema=schema,
    )

