"""Loading assertion files into a dataset in one atomic commit.

A load is one transaction at one system time (now, or a known past time), or, for a backfill with a
system-time column, one transaction per distinct time in ascending order. Files are identified by the SHA-256 of their decompressed bytes; a file already in the dataset's ledger
is skipped, so loading it again changes nothing. Bad rows are quarantined with file, line and reason;
a file that cannot be read at all stops the load before anything is written.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import time
import traceback
from bisect import bisect_right
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.manifest import DataFile
from pyiceberg_core import transform as bucket_transform
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from chronolake.batch_compat.columnar import (
    ParsedRows,
    ValidBatch,
    arrow_values,
    by_distinct,
    parse_batch,
    parse_keys,
    python_values,
    validate_batch,
)
from chronolake.batch_compat.readers import ColumnMapping, RawBatch, RawRecord, SourceFile, raw_text, read_records
from chronolake.iceberg.algebra import DELETE, UPSERT, Assertion, Key, KeyState, KeyTransaction, new_key_timeline
from chronolake.iceberg.exceptions import ChronolakeError, CommitConflict, ConfigError, SystemTimeError, UnreadableFile
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.iceberg.rows import RowBuilder
from chronolake.iceberg.dataset import OPEN, ROW_KIND, SYSTEM_FROM, SYSTEM_TO, VALID_FROM, VALID_TO, DatasetSpec
from chronolake.iceberg.schema import TIMESTAMP, arrow_schema, arrow_type, quarantine_schema
from chronolake.iceberg.table import BitemporalTable
from chronolake.iceberg.temporal import PERIODS, SENTINEL, TimestampError, add_period, format_micros, to_micros

ALREADY_LOADED = "already loaded"
REPEATED = "repeated in this load"
LOADED = "loaded"
#: Total size of CSV/Parquet input from which a load uses two processes by default (below it, forking
#: and reading the input twice cost more than they save).
PARALLEL_MIN_BYTES = 4 << 20
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
    #: Transactions applied (1, or one per distinct time of a system-time column) and the first one's time.
    transactions: int = 0
    first_system_time: int | None = None

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
            "first_system_time": None if self.first_system_time is None else format_micros(self.first_system_time),
            "transactions": self.transactions,
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


@dataclass(frozen=True)
class LoadOptions:
    """How a load assigns system time and reads its files' columns.

    ``system_time``: apply the whole load as one transaction at this (past) time.
    ``mapping.system_time``: a column of per-row system times; each distinct time is one transaction,
    applied in ascending order (a backfill of known history). ``period``: rows without ``valid_to``
    cover ``[valid_from, valid_from + period)`` (day, week, month, quarter, year).
    """

    system_time: int | None = None
    mapping: ColumnMapping = field(default_factory=ColumnMapping)
    period: str | None = None
    #: Processes for a single-transaction load; ``None`` picks 2 for large CSV/Parquet loads on 2+ cores.
    processes: int | None = None


def load_files(
    table: BitemporalTable,
    paths: Sequence[str | Path],
    *,
    options: LoadOptions | None = None,
    show_progress: bool = False,
) -> LoadReport:
    """Load files (in the order given); returns what happened to each file.

    Everything is committed in one atomic append, or, when anything is refused, nothing is.
    """
    options = options or LoadOptions()
    if options.system_time is not None and options.mapping.system_time is not None:
        raise ConfigError("give either a system time or a system-time column, not both")
    if options.period is not None and options.period not in PERIODS:
        raise ConfigError(f"unknown period {options.period!r}; one of {', '.join(PERIODS)}")
    started = time.perf_counter()
    spec = table.spec
    sources = [SourceFile.detect(p) for p in paths]
    report = LoadReport(spec.name, None)

    with _Phases(show_progress) as phases, _without_cycle_collection():
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

        run = _Run(table, options, phases, report)
        if options.mapping.system_time is None:
            run.single_transaction(to_load)
        else:
            run.backfill(to_load)
    report.seconds = time.perf_counter() - started
    return report


def _auto_processes(to_load: list[tuple[SourceFile, FileReport]]) -> int:
    # Processes pay off only for large columnar files (fork, and each process reads every file).
    if any(s.format == "jsonl" for s, _ in to_load) or sum(s.size for s, _ in to_load) < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(2, os.cpu_count() or 1))


class _SharedProgress:
    """Progress phases inside a load process: bytes read go to a counter the parent displays."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        counter = self._counter
        if counter is None:
            return lambda n: None

        def advance(n: int) -> None:
            with counter.get_lock():
                counter.value += n

        return advance


_ERRORS: dict[str, type[ChronolakeError]] = {
    cls.__name__: cls for cls in (UnreadableFile, SystemTimeError, ConfigError, CommitConflict)
}


@contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """A load allocates millions of small tuples (segments, keys, payloads) that form no reference
    cycles; the cyclic collector would traverse them again and again as they accumulate (measured:
    1M assertions load in half the time without it). Reference counting still frees everything."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Run:
    """One load's work: parsing, applying, and the single commit."""

    def __init__(self, table: BitemporalTable, options: LoadOptions, phases: _Phases, report: LoadReport) -> None:
        self.table = table
        self.options = options
        self.phases = phases
        self.report = report
        self.parser = AssertionParser(table.spec)
        self.builder = RowBuilder(table.spec)
        self.quarantine: list[tuple[str, str, int, str, str | None]] = []
        self.latest = table.stable_system_time()
        self._period_ends: dict[int, int] = {}

    def _check_forward(self, earliest: int, what: str) -> None:
        if self.latest is not None and earliest <= self.latest:
            raise SystemTimeError(
                f"{what} {format_micros(earliest)} is not after the latest system time of {self.table.spec.name!r} "
                f"({format_micros(self.latest)}); transaction time is never rewritten, nothing was written"
            )
        now = time.time_ns() // 1_000
        if earliest > now:
            raise SystemTimeError(f"{what} {format_micros(earliest)} is in the future; nothing was written")

    def _rows(self, source: SourceFile, raw: RawBatch) -> _Rows:
        """A batch as parallel lists (lines, parsed fields, system times) with raw text for rejects."""
        column = self.options.mapping.system_time
        lines = list(raw.lines)
        system_times: list[int | None] = []
        texts: Callable[[int], str | None]
        if raw.table is not None:
            table = raw.table
            if column is not None:
                names = table.schema.names
                times, problems = by_distinct(table.column(names.index(column)), self._system_time_value)
                if problems is not None:
                    index = next(i for i, p in enumerate(problems) if p is not None)
                    raise SystemTimeError(f"{source.path}:{lines[index]}: {problems[index]}; nothing was written")
                system_times = times
                table = table.drop_columns([column])
            parsed = parse_batch(self.parser, table)

            def texts(i: int) -> str | None:
                return raw_text(table.slice(i, 1).to_pylist()[0])

        else:
            parsed = ParsedRows([], [], [], [], [], [], [])
            records: list[dict[str, Any]] = []
            for record in raw.records:
                if record.record is None:
                    continue
                lines.append(record.line)
                if column is not None:
                    try:
                        system_times.append(self._system_time_value(record.record.pop(column, None)))
                    except InvalidAssertion as error:
                        raise SystemTimeError(f"{source.path}:{record.line}: {error}; nothing was written") from None
                records.append(record.record)
                try:
                    a = self.parser.parse(record.record)
                except InvalidAssertion as error:
                    _append(parsed, (), UPSERT, 0, None, (), None, str(error))
                else:
                    _append(parsed, a.key, a.op, a.valid_from, a.valid_to, a.payload, a.event_id, None)

            def texts(i: int) -> str | None:
                return raw_text(records[i])

        return _Rows(lines, parsed, system_times, texts)

    def _system_time_value(self, value: Any) -> int:
        column = self.options.mapping.system_time
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InvalidAssertion(f"system-time column {column!r} has no value")
        try:
            return to_micros(value)
        except (TimestampError, ValueError, OverflowError):
            raise InvalidAssertion(f"system-time column {column!r} has no valid timestamp ({value!r})") from None

    def _malformed(self, source: SourceFile, file_report: FileReport, records: list[RawRecord]) -> None:
        for record in records:
            if record.record is None:
                self._reject(source, file_report, record.line, record.problem or "unreadable row", record.raw)

    def _reject(self, source: SourceFile, file_report: FileReport, line: int, reason: str, text: str | None) -> None:
        self.quarantine.append((str(source.path), file_report.sha256, line, reason, text))
        file_report.quarantined += 1

    def _valid_to(self, valid_from: int, valid_to: int | None) -> int | None:
        if valid_to is None and self.options.period is not None:
            end = self._period_ends.get(valid_from)
            if end is None:
                end = self._period_ends[valid_from] = add_period(valid_from, self.options.period)
            return end
        return valid_to

    def single_transaction(self, to_load: list[tuple[SourceFile, FileReport]]) -> None:
        if self.options.system_time is not None:
            t = self.options.system_time
            self._check_forward(t, "system time")
        else:
            t = self.table.next_system_time(self.latest)
        processes = self.options.processes or _auto_processes(to_load)
        if processes > 1:
            self._in_processes(to_load, t, processes)
        else:
            data_files = self._apply_files(to_load, t, None)
            self.quarantine.sort(key=_quarantine_order(to_load))
            self._commit(to_load, t, groups=1, data_files=data_files)

    def _apply_files(
        self, to_load: list[tuple[SourceFile, FileReport]], t: int, partition: tuple[int, int] | None
    ) -> list[DataFile]:
        """Apply every row (or, with ``partition=(i, n)``, the rows of the keys in share i of n) and
        write the resulting rows as (uncommitted) data files.

        The valid rows stay in Arrow and are spilled to local files by key bucket (:class:`_Spill`),
        then applied and written one bucket at a time, so memory follows the largest bucket, not the
        load. Keys without stored versions whose rows carry no event ids (nearly all of a fresh load)
        are applied on plain integers and their versions take key and payload columns from the input
        by position; the other keys (stored state, event ids to check) go through
        :class:`KeyTransaction` with Python values.
        """
        with tempfile.TemporaryDirectory(prefix="chronolake-load-") as directory:
            collected = self._collect(to_load, partition, Path(directory))
            states: dict[Key, KeyState] = {}
            if self.latest is not None and collected.keys:
                states = self.table.load_state(sorted(collected.keys, key=repr))
            data_files: list[DataFile] = []
            for rows in collected.spill.tables():
                versions = self._apply_rows(rows, collected, states, t, to_load)
                presorted = True
                if len(self.builder):
                    versions = pa.concat_tables([versions, self.builder.to_arrow()])
                    self.builder = RowBuilder(self.table.spec)
                    presorted = False
                data_files += self.table.write(versions, presorted=presorted)
        for _, file_report in to_load:
            file_report.applied = file_report.rows - file_report.quarantined - file_report.duplicates
        return data_files

    def _collect(
        self, to_load: list[tuple[SourceFile, FileReport]], partition: tuple[int, int] | None, directory: Path
    ) -> _Collected:
        """Read and validate; quarantine bad rows; spill the valid rows, in input order, by key bucket."""
        spec = self.table.spec
        schema = _collected_schema(spec)
        spill = _Spill(directory, schema, spec, _fanout(self.table, sum(s.size for s, _ in to_load)))
        texts: list[tuple[int, Callable[[int], str | None]]] = []
        keys: set[Key] = set()
        count = 0
        for file_index, (source, file_report) in enumerate(to_load):
            advance = self.phases.phase(f"loading {source.path.name}", source.size)
            for raw in read_records(source, spec, advance, self.options.mapping):
                lines = pa.array(raw.lines, pa.int64())
                table = raw.table
                records = raw.records
                buckets = None
                if table is not None and spill.routes(table, partition):
                    # String keys are their own text: sort by spill bucket (and take this process's
                    # buckets) before validating, so the rows need no second sort to be spilled.
                    table, lines, buckets = spill.route(table, lines, partition)
                    if partition is not None:
                        records = self._share_records(records, partition)
                elif partition is not None:
                    lines, table, records = self._share(lines, table, records, partition)
                file_report.rows += len(records) + (0 if table is None else table.num_rows)
                self._malformed(source, file_report, records)
                if table is not None and table.num_rows:
                    valid = validate_batch(self.parser, table)
                    columns = [*valid.keys, valid.deletes, valid.valid_from, valid.valid_to, *valid.payloads, valid.event_ids]
                    text = _table_text(table)
                else:
                    valid, columns, text, lines = self._records(records)
                    if valid is None:
                        continue
                reasons = valid.reasons
                rows = len(lines)
                batch = pa.RecordBatch.from_arrays(
                    [
                        *columns,
                        lines,
                        pa.repeat(pa.scalar(file_index, pa.int32()), rows),
                        pa.array(range(count, count + rows), pa.int64()),
                    ],
                    schema=schema,
                )
                if reasons is not None:
                    for index, reason in enumerate(reasons):
                        if reason is not None:
                            self._reject(source, file_report, lines[index].as_py(), reason, text(index))
                    keep = pa.array([reason is None for reason in reasons], pa.bool_())
                    batch = batch.filter(keep)
                    if buckets is not None:
                        buckets = buckets.filter(keep)
                if batch.num_rows == 0:
                    continue
                if self.options.period is not None:
                    batch = batch.set_column(
                        schema.get_field_index(_VALID_TO), _VALID_TO, self._period_fill(batch[_VALID_FROM], batch[_VALID_TO])
                    )
                if valid.event_ids.null_count < len(valid.event_ids):
                    # Only rows with event ids can be refused by the algebra: keep their raw text at hand.
                    texts.append((count, text))
                if self.latest is not None:
                    keys.update(_distinct_keys(batch, spec))
                spill.add(batch, buckets)
                count += rows
        spill.close()
        return _Collected(spill, texts, keys)

    def _records(
        self, records: list[RawRecord]
    ) -> tuple[ValidBatch | None, list[pa.Array], Callable[[int], str | None], pa.Array]:
        """JSON records (the parser, one at a time) in the same columns as a validated batch."""
        parsed: list[Assertion | None] = []
        reasons: list[str | None] = []
        kept: list[RawRecord] = []
        for record in records:
            if record.record is None:
                continue
            kept.append(record)
            try:
                parsed.append(self.parser.parse(record.record))
                reasons.append(None)
            except InvalidAssertion as error:
                parsed.append(None)
                reasons.append(str(error))
        lines = pa.array([r.line for r in kept], pa.int64())
        if not kept:
            return None, [], lambda i: None, lines
        spec = self.table.spec
        blank = Assertion((None,) * len(spec.key), UPSERT, 0, None, (None,) * len(spec.columns))
        assertions = [blank if a is None else a for a in parsed]
        keys = [arrow_values([a.key[i] for a in assertions], arrow_type(c)) for i, c in enumerate(spec.key)]
        payloads = [arrow_values([a.payload[i] for a in assertions], arrow_type(c)) for i, c in enumerate(spec.columns)]
        valid = ValidBatch(
            keys,
            pa.array([a.op == DELETE for a in assertions], pa.bool_()),
            pa.array([a.valid_from for a in assertions], pa.int64()),
            pa.array([a.valid_to for a in assertions], pa.int64()),
            payloads,
            pa.array([a.event_id for a in assertions], pa.string()),
            reasons if any(r is not None for r in reasons) else None,
        )
        columns = [*valid.keys, valid.deletes, valid.valid_from, valid.valid_to, *valid.payloads, valid.event_ids]
        return valid, columns, lambda i: raw_text(kept[i].record or {}), lines

    def _period_fill(self, valid_from: pa.Array, valid_to: pa.Array) -> pa.Array:
        encoded = valid_from.dictionary_encode()
        ends = pa.array([self._valid_to(v, None) for v in encoded.dictionary.to_pylist()], pa.int64())
        return pc.coalesce(valid_to, ends.take(encoded.indices))

    def _apply_rows(
        self,
        rows: pa.Table,
        collected: _Collected,
        states: dict[Key, KeyState],
        t: int,
        to_load: list[tuple[SourceFile, FileReport]],
    ) -> pa.Table:
        """The versions opened for keys without stored versions or event ids, in partition and sort
        order; the other keys' rows go through the algebra into the builder (:meth:`_apply_slow`)."""
        spec = self.table.spec
        names = spec.key_names
        if rows.num_rows == 0:
            return arrow_schema(spec).empty_table()
        def column(name: str) -> pa.Array:
            return rows[name].combine_chunks()

        # Partition, then key order (Arrow's sort is stable: each key's rows stay in input order), so
        # the versions come out in the order the data files want.
        partitions = self.table.partition_values(rows)
        ordered = rows.select(names)
        for index, values in enumerate(partitions):
            ordered = ordered.append_column(f"__partition{index}", values)
        order = pc.sort_indices(
            ordered, [(f"__partition{i}", "ascending") for i in range(len(partitions))] + [(n, "ascending") for n in names]
        )
        count = rows.num_rows
        # changed[i]: rows i and i + 1 (in key order) belong to different keys.
        changed = pa.array([], pa.bool_())
        for name in names:
            in_order = column(name).take(order)
            differs = pc.not_equal(in_order.slice(1), in_order.slice(0, count - 1))
            changed = differs if len(changed) == 0 else pc.or_(changed, differs)
        starts = [0, *(i + 1 for i in pc.indices_nonzero(changed).to_pylist())]
        bounds = [*starts, count]
        group = pc.cumulative_sum(pa.concat_arrays([pa.array([0], pa.int64()), changed.cast(pa.int64())]))

        slow: set[int] = set()
        events = column(_EVENT_ID).take(order)
        if events.null_count < count:
            slow.update(pc.unique(group.filter(pc.is_valid(events))).to_pylist())
        if states:
            firsts = order.take(pa.array(starts, pa.int64()))
            key_values = zip(*(python_values(column(n).take(firsts)) for n in names))
            slow.update(g for g, key in enumerate(key_values) if key in states)

        deletes = column(_DELETE).take(order)
        valid_from = column(_VALID_FROM).take(order)
        valid_to = column(_VALID_TO).take(order)
        # A key whose upserts without valid_to arrive in ascending valid time (most keys of a feed)
        # opens [valid_from, next valid_from) per row and [last valid_from, sentinel): no loop needed.
        ascending = pa.concat_arrays(
            [pa.array([True]), pc.or_(changed, pc.greater(valid_from.slice(1), valid_from.slice(0, count - 1)))]
        )
        plain = pc.and_(pc.and_(pc.invert(deletes), pc.is_null(valid_to)), ascending)
        # The other keys loop from their first row that is not in ascending valid time.
        irregular = pc.indices_nonzero(pc.invert(plain))
        first_irregular: dict[int, int] = {}
        for key_group, position in zip(group.take(irregular).to_pylist(), irregular.to_pylist()):
            if key_group not in first_irregular and key_group not in slow:
                first_irregular[key_group] = position
        looped = set(first_irregular)
        simple = pc.invert(pc.is_in(group, pa.array(sorted(looped | slow), pa.int64())))
        next_same = pa.concat_arrays([pc.invert(changed), pa.array([False])])
        next_from = pa.concat_arrays([valid_from.slice(1), pa.array([0], pa.int64())])
        simple_to = pc.if_else(next_same, next_from, pa.scalar(SENTINEL, pa.int64()))

        deletes_list = deletes.to_pylist() if looped else []
        from_list = valid_from.to_pylist() if looped else []
        to_list = valid_to.to_pylist() if looped else []
        froms: list[int] = []
        tos: list[int] = []
        refs: list[int] = []
        groups: list[int] = []
        for key_group in sorted(looped):
            group_froms, group_tos, group_refs = new_key_timeline(
                deletes_list, from_list, to_list, bounds[key_group], bounds[key_group + 1], first_irregular[key_group]
            )
            froms += group_froms
            tos += group_tos
            refs += group_refs
            groups += [key_group] * len(group_refs)
        if slow:
            self._apply_slow(rows, collected, order, bounds, sorted(slow), states, t, to_load)

        opened = pa.table(
            {
                "group": pa.concat_arrays([group.filter(simple), pa.array(groups, pa.int64())]),
                "from": pa.concat_arrays([valid_from.filter(simple), pa.array(froms, pa.int64())]),
                "to": pa.concat_arrays([simple_to.filter(simple), pa.array(tos, pa.int64())]),
                "ref": pa.concat_arrays([pc.indices_nonzero(simple).cast(pa.int64()), pa.array(refs, pa.int64())]),
            }
        )
        if looped:
            opened = opened.take(pc.sort_indices(opened, [("group", "ascending"), ("from", "ascending")]))
        self.report.versions_opened += opened.num_rows
        positions = order.take(opened["ref"])
        return _versions(spec, rows.select([*names, *spec.payload_names]).take(positions), opened["from"], opened["to"], t)

    def _apply_slow(
        self,
        table: pa.Table,
        collected: _Collected,
        order: pa.Array,
        bounds: list[int],
        groups: list[int],
        states: dict[Key, KeyState],
        t: int,
        to_load: list[tuple[SourceFile, FileReport]],
    ) -> None:
        """The keys with stored versions or event ids: the algebra on Python values, in input order."""
        spec = self.table.spec
        sorted_positions = [p for g in groups for p in range(bounds[g], bounds[g + 1])]
        positions = order.take(pa.array(sorted_positions, pa.int64()))
        rows = table.take(positions)
        keys = list(zip(*(python_values(rows[n]) for n in spec.key_names)))
        payloads = list(zip(*(python_values(rows[n]) for n in spec.payload_names))) if spec.payload_names else [()] * rows.num_rows
        fields = zip(
            keys, rows[_DELETE].to_pylist(), rows[_VALID_FROM].to_pylist(), rows[_VALID_TO].to_pylist(), payloads,
            rows[_EVENT_ID].to_pylist(), rows[_LINE].to_pylist(), rows[_FILE].to_pylist(), rows[_POSITION].to_pylist(),
        )
        transactions: dict[Key, KeyTransaction] = {}
        for key, delete, valid_from, valid_to, payload, event_id, line, file_index, position in fields:
            transaction = transactions.get(key)
            if transaction is None:
                transaction = transactions[key] = _transaction(key, states, t)
            assertion = _new_assertion((key, DELETE if delete else UPSERT, valid_from, valid_to, payload, event_id))
            reason = _apply(assertion, transaction)
            if reason is None:
                continue
            source, file_report = to_load[file_index]
            if reason is DUPLICATE:
                file_report.duplicates += 1
            else:
                self._reject(source, file_report, line, reason, collected.text(position))
        self._finish_group(transactions, t)

    def _share(
        self, lines: pa.Array, table: pa.RecordBatch | None, records: list[RawRecord], partition: tuple[int, int]
    ) -> tuple[pa.Array, pa.RecordBatch | None, list[RawRecord]]:
        """The part of a batch whose keys belong to this process. Every row goes to exactly one process:
        rows without a valid key to share 0 (or, on the vectorised path, wherever their text hashes),
        which quarantines them."""
        share, shares = partition
        if table is not None:
            mask = self._share_mask(table, share, shares)
            lines = lines.filter(mask)
            table = table.filter(mask)
        return lines, table, self._share_records(records, partition)

    def _share_records(self, records: list[RawRecord], partition: tuple[int, int]) -> list[RawRecord]:
        share, shares = partition
        mine_records = []
        for record in records:
            if record.record is None:
                if share == 0:
                    mine_records.append(record)
                continue
            try:
                mine = self._share_of(self.parser.parse_key(record.record), shares) == share
            except InvalidAssertion:
                mine = share == 0
            if mine:
                mine_records.append(record)
        return mine_records

    def _string_key(self) -> bool:
        return len(self.table.spec.key) == 1 and self.table.spec.key[0].type == "string"

    def _share_mask(self, table: pa.RecordBatch, share: int, shares: int) -> pa.Array:
        if self._string_key():
            # A string key is its own text: hash the column at once (Iceberg's murmur3 bucket).
            column = table.column(table.schema.names.index(self.table.spec.key_names[0]))
            if pa.types.is_string(column.type):
                buckets = bucket_transform.bucket(column, shares)
                return pc.fill_null(pc.equal(buckets, share), share == 0)
        keys = parse_keys(self.parser, table)
        return pa.array([share == 0 if k is None else self._share_of(k, shares) == share for k in keys], pa.bool_())

    def _share_of(self, key: Key, shares: int) -> int:
        if self._string_key():
            return int(bucket_transform.bucket(pa.array([key[0]], pa.string()), shares)[0].as_py())
        # Other key types: Python's hash, the same in every forked process (they share the hash seed).
        return hash(key) % shares

    def _in_processes(self, to_load: list[tuple[SourceFile, FileReport]], t: int, processes: int) -> None:
        """Split the load by key over forked processes: keys are independent, so each process applies
        its keys' rows in file order and returns its rows as Arrow; this process commits them all at once."""
        context = multiprocessing.get_context("fork")
        consumed = context.Value("q", 0)
        total = sum(s.size for s, _ in to_load) * (2 if self.latest is not None else 1)
        advance = self.phases.phase(f"loading in {processes} processes", total)
        receivers, workers = [], []
        for share in range(processes):
            receiver, sender = context.Pipe(duplex=False)
            worker = context.Process(target=self._worker, args=(to_load, t, (share, processes), sender, consumed))
            worker.start()
            sender.close()
            receivers.append(receiver)
            workers.append(worker)
        results: dict[int, tuple[Any, ...]] = {}
        seen = 0
        while len(results) < processes:
            for share, receiver in enumerate(receivers):
                if share not in results and receiver.poll(0.1):
                    try:
                        results[share] = receiver.recv()
                    except EOFError:
                        results[share] = ("crash", f"load process {share} exited without a result")
            now = consumed.value
            advance(now - seen)
            seen = now
        for worker in workers:
            worker.join()
        for outcome in results.values():
            if outcome[0] == "error":
                raise _ERRORS.get(outcome[1], ChronolakeError)(outcome[2])
            if outcome[0] == "crash":
                raise RuntimeError(f"a load process failed:\n{outcome[1]}")
        data_files = []
        for share in range(processes):
            _, written, quarantine, counts, opened, closed = results[share]
            data_files.extend(written)
            self.quarantine.extend(quarantine)
            self.report.versions_opened += opened
            self.report.versions_closed += closed
            for (_, file_report), (rows, quarantined, duplicates) in zip(to_load, counts):
                file_report.rows += rows
                file_report.quarantined += quarantined
                file_report.duplicates += duplicates
        for _, file_report in to_load:
            file_report.applied = file_report.rows - file_report.quarantined - file_report.duplicates
        self.quarantine.sort(key=_quarantine_order(to_load))
        self._commit(to_load, t, groups=1, data_files=data_files)

    def _worker(
        self,
        to_load: list[tuple[SourceFile, FileReport]],
        t: int,
        partition: tuple[int, int],
        sender: Any,
        consumed: Any,
    ) -> None:
        try:
            self.phases = _SharedProgress(consumed if partition[0] == 0 else None)
            for _, file_report in to_load:
                file_report.rows = file_report.quarantined = file_report.duplicates = 0
            # This process writes its keys' data files itself (in parallel with the others); the
            # parent commits them all in one append, so nothing is visible before that commit.
            written = self._apply_files(to_load, t, partition)
            counts = [(f.rows, f.quarantined, f.duplicates) for _, f in to_load]
            sender.send(("ok", written, self.quarantine, counts, self.report.versions_opened, self.report.versions_closed))
        except ChronolakeError as error:
            sender.send(("error", type(error).__name__, str(error)))
        except BaseException:
            sender.send(("crash", traceback.format_exc()))
        finally:
            sender.close()
            # Skip interpreter teardown: nothing of the parent's (catalog connections, consoles) may be
            # closed from here, and freeing millions of objects one by one is wasted time.
            os._exit(0)

    def backfill(self, to_load: list[tuple[SourceFile, FileReport]]) -> None:
        entries: list[tuple[int, int, Assertion, int, int]] = []
        for index, (source, file_report) in enumerate(to_load):
            advance = self.phases.phase(f"reading {source.path.name}", source.size)
            for raw in read_records(source, self.table.spec, advance, self.options.mapping):
                self._malformed(source, file_report, raw.records)
                rows = self._rows(source, raw)
                file_report.rows += len(rows.lines) + sum(1 for r in raw.records if r.record is None)
                for position, (fields, t) in enumerate(zip(zip(*rows.parsed), rows.system_times)):
                    key, op, valid_from, valid_to, payload, event_id, reason = fields
                    if reason is not None:
                        self._reject(source, file_report, rows.lines[position], reason, rows.text(position))
                        continue
                    assertion = Assertion(key, op, valid_from, self._valid_to(valid_from, valid_to), payload, event_id)
                    entries.append((t, len(entries), assertion, index, rows.lines[position]))
        if not entries:
            names = ", ".join(str(s.path) for s, _ in to_load)
            raise SystemTimeError(f"no row of {names} could be applied; nothing was written")
        entries.sort(key=lambda e: (e[0], e[1]))
        self._check_forward(entries[0][0], "earliest system time")
        states = self.table.load_state(sorted({e[2].key for e in entries}, key=repr)) if self.latest is not None else {}
        groups = sorted({e[0] for e in entries})
        advance = self.phases.phase(f"applying {len(groups)} transactions", len(groups))
        position = 0
        for t in groups:
            transactions: dict[Key, KeyTransaction] = {}
            while position < len(entries) and entries[position][0] == t:
                _, _, assertion, index, line = entries[position]
                source, file_report = to_load[index]
                transaction = transactions.get(assertion.key)
                if transaction is None:
                    transaction = transactions[assertion.key] = _transaction(assertion.key, states, t)
                outcome = _apply(assertion, transaction)
                if outcome is DUPLICATE:
                    file_report.duplicates += 1
                elif outcome is not None:
                    self._reject(source, file_report, line, outcome, raw_text(assertion._asdict()))
                position += 1
            self._finish_group(transactions, t)
            advance(1)
        for _, file_report in to_load:
            file_report.applied = file_report.rows - file_report.quarantined - file_report.duplicates
        self._commit(to_load, groups[-1], groups=len(groups), first=groups[0])

    def _finish_group(self, transactions: dict[Key, KeyTransaction], t: int) -> None:
        for key, transaction in transactions.items():
            change = transaction.finish()
            self.report.versions_opened += len(change.opened)
            self.report.versions_closed += len(change.closed)
            self.builder.add_change(key, change, t)

    def _commit(
        self,
        to_load: list[tuple[SourceFile, FileReport]],
        t: int,
        *,
        groups: int,
        first: int | None = None,
        data_files: Sequence[DataFile] = (),
    ) -> None:
        for _, file_report in to_load:
            self.builder.add_file(file_report.sha256, t)
            file_report.loaded_at = t
        self.table.commit(self.builder, t, "load", _quarantine_table(self.quarantine, t), data_files=data_files)
        self.report.system_time = t
        self.report.first_system_time = first if first is not None else t
        self.report.transactions = groups


def _transaction(key: Key, states: dict[Key, KeyState], t: int) -> KeyTransaction:
    # The key's state outlives this transaction: a backfill's later transactions continue from it.
    state = states.get(key)
    if state is None:
        state = states[key] = KeyState()
    return KeyTransaction(state, t)


def _apply(assertion: Assertion, transaction: KeyTransaction) -> str | None:
    before = transaction.duplicates
    reason = transaction.apply(assertion)
    if reason is None and transaction.duplicates != before:
        return DUPLICATE
    return reason


def _new_assertion(fields: tuple[Any, ...]) -> Assertion:
    return tuple.__new__(Assertion, fields)  # type: ignore[no-any-return]


class _Rows(NamedTuple):
    lines: list[int]
    parsed: ParsedRows
    system_times: list[int | None]
    text: Callable[[int], str | None]


def _append(parsed: ParsedRows, *fields: Any) -> None:
    for values, value in zip(parsed, fields):
        values.append(value)


def _quarantine_table(rows: list[tuple[str, str, int, str, str | None]], t: int) -> pa.Table:
    schema = quarantine_schema()
    if not rows:
        return schema.empty_table()
    source, sha, line, reason, raw = ([row[i] for row in rows] for i in range(5))
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



_DELETE = "__delete"
_VALID_FROM = "__valid_from"
_VALID_TO = "__valid_to"
_EVENT_ID = "__event_id"
_LINE = "__line"
_FILE = "__file"
_POSITION = "__position"


def _collected_schema(spec: DatasetSpec) -> pa.Schema:
    """The valid rows of a load: key and payload columns as stored, the assertion's other fields, and
    where each row came from."""
    return pa.schema(
        [
            *(pa.field(c.name, arrow_type(c)) for c in spec.key),
            pa.field(_DELETE, pa.bool_()),
            pa.field(_VALID_FROM, pa.int64()),
            pa.field(_VALID_TO, pa.int64()),
            *(pa.field(c.name, arrow_type(c)) for c in spec.columns),
            pa.field(_EVENT_ID, pa.string()),
            pa.field(_LINE, pa.int64()),
            pa.field(_FILE, pa.int32()),
            pa.field(_POSITION, pa.int64()),
        ]
    )


#: Input bytes per spill file: a load process holds about one spill file's rows at a time.
SPILL_BYTES = 8 << 20


def _fanout(table: BitemporalTable, input_bytes: int) -> int:
    """Spill files per table bucket, so that each holds about :data:`SPILL_BYTES` of input or less."""
    return max(1, -(-input_bytes // (table.spec.buckets * SPILL_BYTES)))


class _Spill:
    """The valid rows of a load in local Arrow IPC files, one per bucket of the first key column
    (``buckets * fanout`` of them, so each lies within one table partition: Iceberg's bucket is the
    murmur3 hash modulo the count), rows in input order within each."""

    def __init__(self, directory: Path, schema: pa.Schema, spec: DatasetSpec, fanout: int) -> None:
        self._directory = directory
        self._schema = schema
        self._key = spec.key_names[0]
        self._string_key = len(spec.key) == 1 and spec.key[0].type == "string"
        self._count = spec.buckets * fanout
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def routes(self, raw: pa.RecordBatch, partition: tuple[int, int] | None) -> bool:
        """Whether :meth:`route` applies: a single string key, read as text, and shares that divide
        the bucket count."""
        return (
            self._string_key
            and pa.types.is_string(raw.schema.field(self._key).type)
            and (partition is None or self._count % partition[1] == 0)
        )

    def route(
        self, raw: pa.RecordBatch, lines: pa.Array, partition: tuple[int, int] | None
    ) -> tuple[pa.RecordBatch, pa.Array, pa.Array]:
        """Raw rows (and their lines) sorted by spill bucket, input order within a bucket, with the
        buckets; with ``partition=(i, n)`` only share i's rows: the buckets ``b`` with ``b % n == i``
        (the same split as :meth:`_Run._share_of`, since ``n`` divides the bucket count), and the rows
        without a key in share 0 (they are quarantined there)."""
        buckets = bucket_transform.bucket(raw.column(self._key), self._count)
        shares = 1 if partition is None else partition[1]
        share = 0 if partition is None else partition[0]
        # Rows sort by (share, bucket); rows without a key first, with share 0.
        shares_of = pc.subtract(buckets, pc.multiply(pc.divide(buckets, shares), shares))
        rank = pc.fill_null(pc.add(pc.multiply(shares_of.cast(pa.int64()), self._count), buckets.cast(pa.int64())), -1)
        order = pc.sort_indices(rank)
        ranked = rank.take(order)
        low = 0 if share == 0 else pc.sum(pc.less(ranked, share * self._count)).as_py() or 0
        high = pc.sum(pc.less(ranked, (share + 1) * self._count)).as_py() or 0
        mine = order.slice(low, high - low)
        return raw.take(mine), lines.take(mine), buckets.take(mine)

    def add(self, batch: pa.RecordBatch, buckets: pa.Array | None = None) -> None:
        """Append rows to their spill files; ``buckets``: the rows' buckets, rows already sorted by them."""
        if buckets is None:
            buckets = bucket_transform.bucket(batch.column(self._key), self._count)
            order = pc.sort_indices(buckets)  # stable: input order within a bucket
            batch, buckets = batch.take(order), buckets.take(order)
        runs = pc.run_end_encode(buckets)
        start = 0
        for end, bucket in zip(runs.run_ends.to_pylist(), runs.values.to_pylist()):
            writer = self._writers.get(bucket)
            if writer is None:
                writer = self._writers[bucket] = pa.ipc.new_stream(str(self._path(bucket)), self._schema)
            writer.write_batch(batch.slice(start, end - start))
            start = end

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

    def tables(self) -> Iterator[pa.Table]:
        """Each spill file's rows, in bucket order; a file is deleted once read."""
        for bucket in sorted(self._writers):
            path = self._path(bucket)
            with pa.OSFile(str(path)) as source:
                rows = pa.ipc.open_stream(source).read_all()
            path.unlink()
            yield rows

    def _path(self, bucket: int) -> Path:
        return self._directory / f"{bucket}.arrows"


def _distinct_keys(batch: pa.RecordBatch, spec: DatasetSpec) -> set[Key]:
    names = spec.key_names
    distinct = pa.Table.from_batches([batch.select(names)]).group_by(names, use_threads=False).aggregate([])
    return set(zip(*(python_values(distinct[n].combine_chunks()) for n in names)))


class _Collected(NamedTuple):
    spill: _Spill
    #: Raw text of rows with event ids (the only ones the algebra can refuse): (first position, text of
    #: the batch's n-th row) per batch, in position order.
    texts: list[tuple[int, Callable[[int], str | None]]]
    #: The distinct keys, collected only for a load into a dataset with stored versions.
    keys: set[Key]

    def text(self, position: int) -> str | None:
        index = bisect_right([start for start, _ in self.texts], position) - 1
        start, text = self.texts[index]
        return text(position - start)


def _table_text(table: pa.RecordBatch) -> Callable[[int], str | None]:
    return lambda i: raw_text(table.slice(i, 1).to_pylist()[0])


def _versions(spec: DatasetSpec, columns: pa.Table, froms: pa.ChunkedArray, tos: pa.ChunkedArray, t: int) -> pa.Table:
    """Opened versions (``system_to`` = sentinel) with key and payload ``columns`` taken from the input."""
    schema = arrow_schema(spec)
    count = columns.num_rows
    arrays = []
    for declared in schema:
        name = declared.name
        if name in columns.column_names:
            arrays.append(columns[name])
        elif name == VALID_FROM:
            arrays.append(froms.cast(TIMESTAMP))
        elif name == VALID_TO:
            arrays.append(tos.cast(TIMESTAMP))
        elif name == SYSTEM_FROM:
            arrays.append(pa.repeat(pa.scalar(t, TIMESTAMP), count))
        elif name == SYSTEM_TO:
            arrays.append(pa.repeat(pa.scalar(SENTINEL, TIMESTAMP), count))
        elif name == ROW_KIND:
            arrays.append(pa.repeat(pa.scalar(OPEN, pa.string()), count))
        else:
            arrays.append(pa.nulls(count, declared.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _quarantine_order(to_load: list[tuple[SourceFile, FileReport]]) -> Callable[[tuple[Any, ...]], tuple[int, int]]:
    order = {str(source.path): index for index, (source, _) in enumerate(to_load)}
    return lambda q: (order[q[0]], q[2])
