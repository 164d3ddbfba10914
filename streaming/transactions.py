"""What the bitemporal job does with one Kafka record, without Flink: the pure core of `job.py`.

Imported by the job's Python functions inside the Flink mini-cluster (thread mode), so it uses only
the standard library and the pure modules of `chronolake.iceberg` (algebra, parsing, dataset,
temporal). The tools env imports it too, for unit tests and for the SQL the job runs.

Flow per record: `system_time` (per source partition, in partition order) -> `EventRouter.route`
(decode, pick the dataset, validate with the shared `AssertionParser`; bad input becomes a
quarantine row) -> `EntityTimeline.apply` (one `KeyTransaction` at `t` on the key's `KeyState`) ->
rows of the twin-row layout, each a `SinkRow` addressed to one Iceberg table. Every value of a sink
row is text (or None): thread mode converts only simple types, and Flink SQL casts the text to the
table's column types (`insert_sql`).
"""

from __future__ import annotations

import base64
import json
import marshal
import math
import pickle
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from collections.abc import Sequence
from typing import Any, NamedTuple

from chronolake.iceberg.algebra import Assertion, Key, KeyState, KeyTransaction, Segment
from chronolake.iceberg.dataset import CONTROL, FILE, LEDGER_PREFIX, QUARANTINE_SUFFIX, Column, DatasetSpec
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.iceberg.twins import StoredRow, change_rows, marker_row

#: Where records go whose dataset cannot be known (broken JSON, no or an unknown `dataset`). The
#: hyphen makes it a name no dataset can have (dataset names are letters, digits, underscores).
UNROUTED_QUARANTINE = "stream-unrouted" + QUARANTINE_SUFFIX
DATASET_FIELD = "dataset"
# Fields a publisher (`chronolake load --via-stream`) adds to an event; no column can be named so.
#: {"file": path, "line": n}: where the assertion came from; its quarantine row names the file and line.
ORIGIN_FIELD = "@origin"
#: A reason: the publisher found the row unusable (a malformed CSV row); it is quarantined as such.
REJECTED_FIELD = "@rejected"
#: The row's text as the file had it, kept in the quarantine row of a rejected row.
RAW_FIELD = "@raw"
#: {"sha256": hex}: the file is published in full; the job writes its ledger row (idempotency).
LEDGER_FIELD = "@ledger"
#: Fields of an event besides the dataset's assertion fields.
_ENVELOPE_FIELDS = frozenset({DATASET_FIELD, ORIGIN_FIELD, REJECTED_FIELD, RAW_FIELD, LEDGER_FIELD})
#: Longest record value applied; longer ones are quarantined with their first `RAW_KEPT` characters.
DEFAULT_MAX_EVENT_BYTES = 1 << 20
RAW_KEPT = 4096
_TIMESTAMP_CACHE = 1 << 16

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Text = str | None


class SinkRow(NamedTuple):
    """One row for one Iceberg table (`target` = table name in the job's namespace), all values text."""

    target: str
    values: tuple[Text, ...]


def system_time(log_time_ms: int, previous: int | None) -> int:
    """`max(log timestamp, previous t of the partition + 1 us)`, in microseconds."""
    t = log_time_ms * 1000
    return t if previous is None or t > previous else previous + 1


def sql_timestamp(micros: int) -> str:
    """`yyyy-MM-dd HH:mm:ss.ffffff` (UTC), the text Flink casts to TIMESTAMP(6) exactly."""
    d = _EPOCH + timedelta(microseconds=micros)
    return (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d} "
        f"{d.hour:02d}:{d.minute:02d}:{d.second:02d}.{d.microsecond:06d}"
    )


def quarantine_row(target: str, source: str, offset: int | None, reason: str, raw: str, t: int) -> SinkRow:
    """`offset` is the `line` column: a Kafka offset or a file line; None for a Kinesis record
    (`chronolake.streaming.sources.record_source`)."""
    kept = raw if len(raw) <= RAW_KEPT else raw[:RAW_KEPT]
    line = None if offset is None else str(offset)
    return SinkRow(target, (source, None, line, reason, kept, sql_timestamp(t)))


def _sql_cast(name: str, column_type: str) -> str:
    quoted = f"`{name}`"
    if column_type == "string":
        return quoted
    if column_type == "timestamp":
        # Flink 1.20's TO_TIMESTAMP_LTZ takes only precision 0 or 3; the session zone is UTC.
        return f"CAST(CAST({quoted} AS TIMESTAMP(6)) AS TIMESTAMP_LTZ(6))"
    sql_type = {"long": "BIGINT", "double": "DOUBLE", "date": "DATE", "boolean": "BOOLEAN"}.get(column_type)
    return f"CAST({quoted} AS {sql_type or column_type.upper()})"


def insert_sql(catalog: str, namespace: str, table: str, view: str, columns: Sequence[Column]) -> str:
    """`INSERT INTO` a table from a view of text columns with the same names."""
    names = ", ".join(f"`{c.name}`" for c in columns)
    casts = ", ".join(_sql_cast(c.name, c.type) for c in columns)
    return f"INSERT INTO `{catalog}`.`{namespace}`.`{table}` ({names}) SELECT {casts} FROM `{view}`"


def _text(value: Any, column_type: str) -> Text:
    """A payload or key value (the algebra's representation) as text Flink SQL casts back exactly."""
    if value is None:
        return None
    if column_type == "timestamp":
        return sql_timestamp(value)
    if column_type == "boolean":
        return "true" if value else "false"
    if column_type == "double":
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(float(value))
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


@dataclass(frozen=True)
class Routed:
    """A record that parsed: its dataset, key and assertion, and the canonical key text to key by."""

    dataset: str
    key: Key
    entity: str
    assertion: Assertion


def record_text(value: bytes | None) -> tuple[str, str | None]:
    """A record value as text, and the quarantine reason when it is not UTF-8 (the text then shows
    each bad byte as U+FFFD). A missing value (a Kafka tombstone) is the empty text."""
    if value is None:
        return "", None
    try:
        return bytes(value).decode("utf-8"), None
    except UnicodeDecodeError as error:
        return bytes(value).decode("utf-8", "replace"), f"not valid UTF-8 ({error.reason} at byte {error.start})"


class EventRouter:
    """Decodes a record value and validates it against its dataset; bad records become quarantine rows."""

    def __init__(self, specs: dict[str, DatasetSpec], max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.parsers = {name: AssertionParser(spec) for name, spec in specs.items()}
        self.timelines = {name: EntityTimeline(spec) for name, spec in specs.items()}
        self.max_event_bytes = max_event_bytes

    def route(self, raw: str, source: str, offset: int | None, t: int) -> Routed | SinkRow:
        size = len(raw.encode("utf-8", "surrogatepass"))
        if size > self.max_event_bytes:
            # Too large to parse safely: route by a cheap look at the text, never by decoding it.
            found = _dataset_by_prefix(raw, self.parsers)
            target = UNROUTED_QUARANTINE if found is None else found + QUARANTINE_SUFFIX
            reason = f"event of {size} bytes exceeds {self.max_event_bytes}"
            return quarantine_row(target, source, offset, reason, raw, t)
        try:
            record: Any = json.loads(raw)
        except (ValueError, RecursionError):
            return quarantine_row(UNROUTED_QUARANTINE, source, offset, "not a JSON object", raw, t)
        dataset = record.get(DATASET_FIELD) if isinstance(record, dict) else None
        if not isinstance(record, dict):
            return quarantine_row(UNROUTED_QUARANTINE, source, offset, "not a JSON object", raw, t)
        if "\\u" in raw and not _encodable(record):
            # A lone surrogate (`"\\ud800"`) cannot become a Java string; it would fail the job.
            return quarantine_row(UNROUTED_QUARANTINE, source, offset, "invalid unicode escape", raw, t)
        source, offset = origin(record, source, offset)
        if not isinstance(dataset, str) or dataset not in self.parsers:
            return quarantine_row(UNROUTED_QUARANTINE, source, offset, f"unknown dataset {dataset!r}", raw, t)
        quarantine = dataset + QUARANTINE_SUFFIX
        if REJECTED_FIELD in record:
            kept = record.get(RAW_FIELD)
            return quarantine_row(quarantine, source, offset, str(record[REJECTED_FIELD]), str(kept if kept is not None else raw), t)
        if LEDGER_FIELD in record:
            ledger = record[LEDGER_FIELD]
            sha256 = ledger.get("sha256") if isinstance(ledger, dict) else None
            if not isinstance(sha256, str) or len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
                return quarantine_row(quarantine, source, offset, "ledger event without a SHA-256", raw, t)
            return self.timelines[dataset].ledger(sha256, t)
        parser = self.parsers[dataset]
        # As a batch load does: a misspelt field (`valid_too`) must not be silently ignored.
        unknown = [name for name in record if name not in parser.known_fields and name not in _ENVELOPE_FIELDS]
        if unknown:
            return quarantine_row(quarantine, source, offset, f"unknown field(s) {', '.join(map(str, unknown))}", raw, t)
        try:
            assertion = parser.parse(record)
        except InvalidAssertion as error:
            return quarantine_row(quarantine, source, offset, str(error), raw, t)
        return Routed(dataset, assertion.key, repr(assertion.key), assertion)


def origin(record: dict[str, Any], source: str, offset: int | None) -> tuple[str, int | None]:
    """The source and line a quarantine row names: the file and line of a published file's row
    (`@origin`), else the stream's record coordinates."""
    found = record.get(ORIGIN_FIELD)
    if isinstance(found, dict) and isinstance(found.get("file"), str) and type(found.get("line")) is int:
        return found["file"], found["line"]
    return source, offset


def _encodable(record: dict[str, Any]) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dataset_by_prefix(raw: str, parsers: dict[str, AssertionParser]) -> str | None:
    head = raw[:RAW_KEPT]
    for name in parsers:
        if f'"{DATASET_FIELD}": "{name}"' in head or f'"{DATASET_FIELD}":"{name}"' in head:
            return name
    return None


class EntityTimeline:
    """Applies one record (one transaction) to one key's state and gives the rows of its net effect."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.parser = AssertionParser(spec)
        self._key_types = [c.type for c in spec.key]
        self._payload_types = [c.type for c in spec.columns]
        self._quarantine = spec.name + QUARANTINE_SUFFIX
        # Valid times repeat (days), and the rows of one transaction share t and the sentinel:
        # formatting them was half of the per-record cost.
        self._timestamps: dict[int, str] = {}

    def apply(self, state: KeyState, raw: str, source: str, offset: int | None, t: int) -> list[SinkRow]:
        """Mutates `state`. `raw` is re-parsed here: an `Assertion` (decimals, dates) does not cross
        Flink's Python boundary, and parsing is deterministic, so both stages see the same assertion."""
        record = json.loads(raw)
        assertion = self.parser.parse(record)
        source, offset = origin(record, source, offset)
        latest = max((s.system_from for s in state.segments), default=None)
        if latest is not None and t <= latest:
            # Only another writer (a batch load with a later clock) can cause this; the algebra
            # needs t after every version it closes, so the record is kept aside, not misapplied.
            reason = f"system time {sql_timestamp(t)} is not after the key's latest version {sql_timestamp(latest)}"
            return [quarantine_row(self._quarantine, source, offset, reason, raw, t)]
        transaction = KeyTransaction(state, t)
        refused = transaction.apply(assertion)
        if refused is not None:
            return [quarantine_row(self._quarantine, source, offset, refused, raw, t)]
        return [self._sink(row) for row in change_rows(assertion.key, transaction.finish(), t)]

    def ledger(self, sha256: str, t: int) -> SinkRow:
        """The file-ledger row of a file published through the stream (`LEDGER_FIELD`)."""
        return self._sink(marker_row(None, t, FILE, f"{LEDGER_PREFIX}{sha256}"))

    def control(self, stable: int) -> SinkRow:
        """The row that publishes the dataset's stable system time (`system_from` = stable)."""
        return self._sink(marker_row(None, stable, CONTROL))

    def _sink(self, row: StoredRow) -> SinkRow:
        """A stored row (`chronolake.iceberg.twins`) as the text values of the table's columns."""
        key = row.key or (None,) * len(self._key_types)
        payload = row.payload or (None,) * len(self._payload_types)
        cache = self._timestamps
        if len(cache) > _TIMESTAMP_CACHE:
            cache.clear()
        times = []
        for v in row[2:6]:
            if v is None:
                times.append(None)
            elif (text := cache.get(v)) is not None:
                times.append(text)
            else:
                times.append(cache.setdefault(v, sql_timestamp(v)))
        values = (
            *(_text(v, kind) for v, kind in zip(key, self._key_types)),
            *(_text(v, kind) for v, kind in zip(payload, self._payload_types)),
            *times,
            row.row_kind,
            row.event_id,
            row.event_digest,
        )
        return SinkRow(self.spec.name, values)


class StateCodec:
    """A key's `KeyState` as the text the job keeps in RocksDB, and back.

    `marshal` of plain tuples (decimals as text, dates as ordinals) behind a format tag, base64:
    about 8x cheaper both ways than pickling `Segment` named tuples holding `Decimal` objects, which
    was the largest per-record cost of the job. Text without the tag is a pickle (the first format),
    still read.
    """

    TAG = "M1:"

    def __init__(self, spec: DatasetSpec) -> None:
        self._decimals = tuple(i for i, c in enumerate(spec.columns) if c.type.startswith("decimal"))
        self._dates = tuple(i for i, c in enumerate(spec.columns) if c.type == "date")

    def _plain(self, payload: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self._decimals and not self._dates:
            return payload
        values = list(payload)
        for i in self._decimals:
            if values[i] is not None:
                values[i] = str(values[i])
        for i in self._dates:
            if values[i] is not None:
                values[i] = values[i].toordinal()
        return tuple(values)

    def _typed(self, payload: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self._decimals and not self._dates:
            return payload
        values = list(payload)
        for i in self._decimals:
            if values[i] is not None:
                values[i] = Decimal(values[i])
        for i in self._dates:
            if values[i] is not None:
                values[i] = date.fromordinal(values[i])
        return tuple(values)

    def encode(self, state: KeyState, seen: dict[str, int] | None = None) -> str:
        """`seen`: when each remembered event id was applied (`remember_event_ids`)."""
        plain = self._plain
        segments = [(s[0], s[1], s[2], plain(s[3]), s[4], s[5]) for s in state.segments]
        return self.TAG + base64.b64encode(marshal.dumps((segments, state.events, seen or {}), 4)).decode("ascii")

    def decode(self, text: str) -> tuple[KeyState, dict[str, int]]:
        if not text.startswith(self.TAG):
            legacy: KeyState = pickle.loads(base64.b64decode(text))
            return legacy, {}
        segments, events, seen = marshal.loads(base64.b64decode(text[len(self.TAG):]))
        typed = self._typed
        new = tuple.__new__
        return KeyState([new(Segment, (s[0], s[1], s[2], typed(s[3]), s[4], s[5])) for s in segments], events), seen


def remember_event_ids(state: KeyState, seen: dict[str, int], t: int, ttl_us: int) -> None:
    """Bounded dedup state: an event id is remembered for `ttl_us` of system time after the
    transaction that applied it (or, for ids the key's state already had, after the first
    transaction that found them); then it is forgotten, and a redelivery of it after that would be
    applied as a new event. System time, not the wall clock: a replay from a checkpoint forgets
    exactly what the first run forgot. Mutates both."""
    events = state.events
    for event_id in events.keys() - seen.keys():
        seen[event_id] = t
    horizon = t - ttl_us
    expired = [event_id for event_id, at in seen.items() if at <= horizon]
    for event_id in expired:
        del seen[event_id]
        events.pop(event_id, None)


def stable_system_time(
    high_water_marks: dict[int, int], last_seen_ms: dict[int, int], now_ms: int, partitions: int, idle_ms: int
) -> int | None:
    """The stable system time: min over source partitions of their high-water mark (the t of their
    latest record). A partition with no record for `idle_ms` of processing time counts as caught
    up and idle and does not hold the others back; when all are idle, the maximum mark is stable.
    None until every partition has delivered a record.

    The idleness rule assumes the job's consumer is not lagging on an idle partition: a record
    appended to it would get a log time of at least the broker's clock at append time.
    """
    if partitions <= 0 or len(high_water_marks) < partitions:
        return None
    active = [t for p, t in high_water_marks.items() if now_ms - last_seen_ms.get(p, now_ms) < idle_ms]
    return min(active) if active else max(high_water_marks.values())
