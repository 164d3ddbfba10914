"""Reading assertion files (CSV, JSON lines, Parquet; optionally gzip) as batches of raw records.

Rows that cannot even be split into fields come out as records with a problem (they are quarantined);
a file that cannot be read at all raises :class:`UnreadableFile` and nothing is loaded.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from chronolake.iceberg.dataset import DatasetSpec
from chronolake.iceberg.exceptions import UnreadableFile

_CHUNK = 1 << 20
_CSV_BLOCK = 4 << 20
_JSON_BATCH = 20_000
_RAW_LIMIT = 2_000
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class ColumnMapping:
    """How a file's columns map onto assertion fields, for files not written in chronolake's own terms."""

    valid_from: str = "valid_from"
    valid_to: str = "valid_to"
    #: A column holding each row's system time (a backfill); kept in the record under its own name.
    system_time: str | None = None

    @property
    def renames(self) -> dict[str, str]:
        return {k: v for k, v in ((self.valid_from, "valid_from"), (self.valid_to, "valid_to")) if k != v}

    def fields(self, spec: DatasetSpec) -> set[str]:
        names = {*spec.key_names, *spec.payload_names, "valid_from", "valid_to", "op", "event_id"}
        if self.system_time is not None:
            names.add(self.system_time)
        return names


class RawRecord(NamedTuple):
    line: int
    record: dict[str, Any] | None  # None when the row could not be split into fields
    problem: str | None
    raw: str | None


class RawBatch(NamedTuple):
    """A slice of a file in order: columnar rows (CSV, Parquet) and/or single records (JSON lines,
    and rows too malformed to split into fields)."""

    lines: list[int]  # line of each row of ``table``
    table: pa.RecordBatch | None  # columns named as assertion fields
    records: list[RawRecord]


@dataclass(frozen=True)
class SourceFile:
    path: Path
    format: str
    compressed: bool

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @classmethod
    def detect(cls, path: str | Path) -> SourceFile:
        file = Path(path)
        suffixes = [s.lower() for s in file.suffixes]
        compressed = bool(suffixes) and suffixes[-1] == ".gz"
        if compressed:
            suffixes = suffixes[:-1]
        kind = FORMATS.get(suffixes[-1]) if suffixes else None
        if kind is None:
            raise UnreadableFile(f"{file}: unknown file type (expected .csv, .jsonl or .parquet, optionally .gz)")
        if not file.is_file():
            raise UnreadableFile(f"{file}: no such file")
        return cls(file, kind, compressed)

    def open_raw(self) -> IO[bytes]:
        try:
            return open(self.path, "rb")
        except OSError as error:
            raise UnreadableFile(f"{self.path}: {error.strerror}") from None

    def open(self, on_bytes: Callable[[int], None] | None = None) -> IO[bytes]:
        """The decompressed content; ``on_bytes`` hears how many raw (compressed) bytes were consumed."""
        raw: IO[bytes] = self.open_raw()
        if on_bytes is not None:
            raw = _Counting(raw, on_bytes)  # type: ignore[assignment]
        if self.compressed:
            return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
        return raw

    def sha256(self, on_bytes: Callable[[int], None] | None = None) -> str:
        """SHA-256 of the decompressed bytes: the file's identity for the idempotency ledger."""
        digest = hashlib.sha256()
        try:
            with self.open(on_bytes) as stream:
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
        except (OSError, EOFError, zlib.error) as error:
            raise UnreadableFile(f"{self.path}: cannot decompress ({_reason(error)})") from None
        return digest.hexdigest()


class _Counting(io.RawIOBase):
    def __init__(self, inner: IO[bytes], on_bytes: Callable[[int], None]) -> None:
        self._inner = inner
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        self._on_bytes(len(data))
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _reason(error: BaseException) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def check_columns(source: SourceFile, names: list[str], spec: DatasetSpec, mapping: ColumnMapping) -> None:
    """Header check on the file's names after ``mapping`` renamed them."""
    known = mapping.fields(spec)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnreadableFile(f"{source.path}: unknown column(s) {', '.join(unknown)} for dataset {spec.name!r}")
    required = [*spec.key_names, "valid_from", *spec.payload_names]
    if mapping.system_time is not None:
        required.append(mapping.system_time)
    missing = [n for n in required if n not in names]
    if missing:
        shown = [mapping.valid_from if n == "valid_from" else n for n in missing]
        raise UnreadableFile(f"{source.path}: missing column(s) {', '.join(shown)}")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UnreadableFile(f"{source.path}: duplicated column(s) {', '.join(duplicated)}")


def read_records(
    source: SourceFile,
    spec: DatasetSpec,
    on_bytes: Callable[[int], None] | None = None,
    mapping: ColumnMapping | None = None,
) -> Iterator[RawBatch]:
    """Batches of rows in file order, with their line numbers (header = line 1 for CSV)."""
    mapping = mapping or ColumnMapping()
    try:
        if source.format == "csv":
            yield from _csv(source, spec, on_bytes, mapping)
        elif source.format == "jsonl":
            yield from _jsonl(source, spec, on_bytes, mapping)
        else:
            yield from _parquet(source, spec, on_bytes, mapping)
    except UnreadableFile:
        raise
    except (OSError, EOFError, zlib.error, pa.ArrowException, UnicodeDecodeError) as error:
        raise UnreadableFile(f"{source.path}: cannot read {source.format} ({_reason(error)})") from None


def _csv(
    source: SourceFile, spec: DatasetSpec, on_bytes: Callable[[int], None] | None, mapping: ColumnMapping
) -> Iterator[RawBatch]:
    with source.open() as peek:
        first = peek.readline().decode("utf-8-sig")
    header = next(csv.reader([first]), [])
    header = [name.strip() for name in header]
    if not header:
        raise UnreadableFile(f"{source.path}: empty file (expected a header row)")
    renames = mapping.renames
    fields = [renames.get(name, name) for name in header]
    check_columns(source, fields, spec, mapping)

    bad_rows: list[tuple[int, str, str]] = []

    def invalid_row(row: Any) -> str:
        # Malformed rows are quarantined, not fatal. Arrow knows their line numbers only when reading
        # single-threaded, which is why use_threads is off (parsing is not the bottleneck).
        number = row.number if row.number is not None else -1
        bad_rows.append((number, f"expected {row.expected_columns} fields, found {row.actual_columns}", row.text))
        return "skip"

    stream = source.open(on_bytes)
    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=invalid_row, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            null_values=[""],
        ),
    )
    line = 1  # the header
    with stream:
        for batch in reader:
            malformed = [
                RawRecord(number, None, f"malformed CSV row: {problem}", _clip(text)) for number, problem, text in bad_rows
            ]
            bad_lines = {number for number, _, _ in bad_rows if number > 0}
            bad_rows.clear()
            if bad_lines:
                lines = []
                for _ in range(batch.num_rows):
                    line += 1
                    while line in bad_lines:
                        line += 1
                    lines.append(line)
            else:
                lines = list(range(line + 1, line + 1 + batch.num_rows))
                line += batch.num_rows
            yield RawBatch(lines, batch.rename_columns(fields), malformed)


def _jsonl(
    source: SourceFile, spec: DatasetSpec, on_bytes: Callable[[int], None] | None, mapping: ColumnMapping
) -> Iterator[RawBatch]:
    known = mapping.fields(spec)
    renames = mapping.renames
    batch: list[RawRecord] = []
    with source.open(on_bytes) as stream:
        for number, raw_line in enumerate(stream, start=1):
            text = raw_line.strip()
            if not text:
                continue
            try:
                record = json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                batch.append(RawRecord(number, None, f"broken JSON: {_reason(error)}", _clip(text)))
            else:
                if renames and isinstance(record, dict):
                    record = {renames.get(k, k): v for k, v in record.items()}
                if not isinstance(record, dict):
                    batch.append(RawRecord(number, None, "not a JSON object", _clip(text)))
                elif unknown := [k for k in record if k not in known]:
                    batch.append(RawRecord(number, None, f"unknown field(s) {', '.join(map(str, unknown))}", _clip(text)))
                else:
                    batch.append(RawRecord(number, record, None, None))
            if len(batch) >= _JSON_BATCH:
                yield RawBatch([], None, batch)
                batch = []
    if batch:
        yield RawBatch([], None, batch)


def _parquet(
    source: SourceFile, spec: DatasetSpec, on_bytes: Callable[[int], None] | None, mapping: ColumnMapping
) -> Iterator[RawBatch]:
    if source.compressed:
        with source.open() as stream:
            handle: Any = io.BytesIO(stream.read())
    else:
        handle = str(source.path)
    parquet = pq.ParquetFile(handle)
    renames = mapping.renames
    names = [renames.get(n, n) for n in parquet.schema_arrow.names]
    check_columns(source, names, spec, mapping)
    row = 0
    total = max(parquet.metadata.num_rows, 1)
    size = source.size
    for batch in parquet.iter_batches(batch_size=65_536):
        arrays = []
        for column in batch.columns:
            if pa.types.is_timestamp(column.type) and column.type.unit == "ns":
                column = column.cast(pa.timestamp("us", tz=column.type.tz), safe=False)
            arrays.append(column)
        renamed = pa.RecordBatch.from_arrays(arrays, names=names)
        lines = list(range(row + 1, row + 1 + renamed.num_rows))
        row += renamed.num_rows
        if on_bytes is not None:
            on_bytes(int(size * renamed.num_rows / total))
        yield RawBatch(lines, renamed, [])


def _clip(text: str | bytes | None) -> str | None:
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text if len(text) <= _RAW_LIMIT else text[:_RAW_LIMIT] + "..."


def raw_text(record: dict[str, Any]) -> str:
    """The record as the quarantine shows it."""
    return _clip(json.dumps(record, default=str)) or ""

