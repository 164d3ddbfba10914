"""What the bitemporal job does with its records, without Flink: the pure core of `job.py`.

Imported by the job's Python functions inside the Flink mini-cluster (thread mode), so it uses only
the standard library and the pure modules of `chronolake.iceberg` (algebra, parsing, dataset,
temporal). The tools env imports it too, for unit tests.

Flow per record: `system_time` (per source partition, in partition order) -> `EventRouter.route`
(decode, pick the dataset, validate with the shared `AssertionParser`; bad input becomes a
quarantine row; a good one becomes a `Routed` whose `event` is a plain tuple that crosses to the
next operator as it is) -> `EntityTimeline.apply` (one `KeyTransaction` at `t` on the key's
`KeyState`) -> rows of the twin-row layout, each a `SinkRow` addressed to one Iceberg table.

Every value of a sink row is text (or None), but for the times (`micros_columns`): the job's Java
side (`io.chronolake.flink.JsonRows`) parses the text as the table's column types. Payloads are
turned into that text once, when an event is validated, and the job's key states hold them as text
too (`StateCodec`): the algebra never looks inside a payload, so nothing is converted back and
forth per record. Event digests are taken from the typed payload
(`Assertion.digest`), exactly as a batch load takes them, so a redelivery is recognised whichever
path stored the first delivery.
"""

from __future__ import annotations

import base64
import json
import marshal
import math
import zlib
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from collections.abc import Callable, Iterable, Iterator
from bisect import bisect_right
from itertools import accumulate, islice
from operator import itemgetter
from typing import Any, NamedTuple

from chronolake.iceberg.algebra import Assertion, Key, KeyState, KeyTransaction, Segment
from chronolake.iceberg.dataset import CONTROL, FILE, LEDGER_PREFIX, QUARANTINE_SUFFIX, TIME_COLUMNS, DatasetSpec
from chronolake.iceberg.parsing import AssertionParser, InvalidAssertion
from chronolake.iceberg.twins import StoredRow, change_rows, marker_row
from chronolake.streaming.sources import record_source

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

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Text = str | None


class SinkRow(NamedTuple):
    """One row for one Iceberg table (`target` = table name in the job's namespace): every value
    text or None, except the timestamps of `MICROS_COLUMNS`, which are microseconds (int)."""

    target: str
    values: tuple[Any, ...]


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
    return SinkRow(target, (source, None, line, reason, kept, t))


#: Columns the job hands to Flink as microseconds (ints in Python, `Instant`s in Java) instead of
#: text: the four times of a dataset table and the quarantine's system time.
MICROS_COLUMNS = TIME_COLUMNS
QUARANTINE_MICROS_COLUMNS = ("system_time",)


def micros_columns(table: str) -> tuple[str, ...]:
    return QUARANTINE_MICROS_COLUMNS if table.endswith(QUARANTINE_SUFFIX) else MICROS_COLUMNS


def _text(value: Any, column_type: str) -> Text:
    """A payload or key value (the algebra's representation) as text `JsonRows` parses back exactly."""
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


#: Positions in `Routed.event`, the plain tuple (marshal-able) a valid record travels as.
EV_DATASET, EV_ENTITY, EV_KEY, EV_OP, EV_FROM, EV_TO, EV_PAYLOAD, EV_ID, EV_DIGEST, EV_T, EV_SOURCE, EV_LINE, EV_RAW = range(13)


class Routed(NamedTuple):
    """A record that parsed: its dataset, typed key and assertion, and `event`: the tuple
    `(dataset, entity, key texts, op, valid_from, valid_to, payload texts, event_id, digest, t,
    source, line, raw)` (positions `EV_*`), where `entity` is `dataset` NUL `repr(key)`, the state's
    key, and `source`/`line` name the record in quarantine rows (a published file's own line)."""

    dataset: str
    key: Key
    assertion: Assertion
    event: tuple[Any, ...]


def entity_id(dataset: str, key: Key) -> str:
    """The name of a key's state in the job: unique per dataset and key, the same in every run."""
    return f"{dataset}\x00{key!r}"


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
        self.texts = {name: Texts(spec) for name, spec in specs.items()}
        self._allowed = {name: parser.known_fields | _ENVELOPE_FIELDS for name, parser in self.parsers.items()}
        self.max_event_bytes = max_event_bytes

    def route(self, raw: str, source: str, offset: int | None, t: int, size: int | None = None) -> Routed | SinkRow:
        """`size`: the record's length in bytes, when the caller knows it."""
        if size is None:
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
        if not self._allowed[dataset].issuperset(record):
            unknown = [name for name in record if name not in self._allowed[dataset]]
            return quarantine_row(quarantine, source, offset, f"unknown field(s) {', '.join(map(str, unknown))}", raw, t)
        try:
            assertion = parser.parse(record)
        except InvalidAssertion as error:
            return quarantine_row(quarantine, source, offset, str(error), raw, t)
        texts = self.texts[dataset]
        key, event_id = assertion.key, assertion.event_id
        event = (
            dataset, entity_id(dataset, key), texts.key(key), assertion.op, assertion.valid_from, assertion.valid_to,
            texts.payload(assertion.payload), event_id, None if event_id is None else assertion.digest(), t,
            source, offset, raw,
        )
        return Routed(dataset, key, assertion, event)


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


class Texts:
    """A dataset's typed key and payload values as the text of their sink columns (`_text`)."""

    def __init__(self, spec: DatasetSpec) -> None:
        self._key_types = tuple(c.type for c in spec.key)
        self._payload_types = tuple(c.type for c in spec.columns)
        # Columns whose value is its own text (a str, or None): passed through as they are.
        self._plain_payload = all(kind == "string" for kind in self._payload_types)
        self._plain_key = all(kind == "string" for kind in self._key_types)

    def key(self, key: Key) -> tuple[Text, ...]:
        return key if self._plain_key else tuple(map(_text, key, self._key_types))

    def payload(self, payload: tuple[Any, ...]) -> tuple[Text, ...]:
        return payload if self._plain_payload else tuple(map(_text, payload, self._payload_types))

    def state(self, state: KeyState) -> KeyState:
        """A key state with typed payloads (read from the table) as one with text payloads, its
        segments plain tuples (`Segment`)."""
        payload = self.payload
        segments = [(s[0], s[1], s[2], payload(s[3]), s[4], s[5]) for s in state.segments]
        return KeyState(segments, dict(state.events))


_SYSTEM_FROM = itemgetter(2)


def latest_system_from(segments: list[Segment]) -> int | None:
    """The latest `system_from` of a key's segments (None: it has none)."""
    return max(map(_SYSTEM_FROM, segments)) if segments else None


class EntityTimeline:
    """Applies one record (one transaction) to one key's state and gives the rows of its net effect."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._quarantine = spec.name + QUARANTINE_SUFFIX
        self._empty_key = (None,) * len(spec.key)
        self._empty_payload = (None,) * len(spec.columns)

    def apply(self, state: KeyState, seen: dict[str, int], event: tuple[Any, ...], ttl_us: int) -> list[SinkRow]:
        """Applies `event` (`Routed.event`) at its t; mutates `state` (text payloads) and `seen`
        (when each remembered event id was applied: `remember_event_ids`). The rows of `transact`."""
        return self.transact(state, seen, event, ttl_us, latest_system_from(state.segments))[0]

    def transact(
        self, state: KeyState, seen: dict[str, int], event: tuple[Any, ...], ttl_us: int, latest: int | None
    ) -> tuple[list[SinkRow], int, int, int | None]:
        """`apply`, for a caller that holds the key: `latest` is `latest_system_from(state.segments)`,
        which it keeps instead of reading every segment per event. Returns the rows, where the
        segments it changed begin and how many after them it left (`KeyTransaction.changed_from`,
        `.unchanged_tail`), and the new latest system time."""
        t = event[EV_T]
        segments = state.segments
        changed_from = unchanged_tail = len(segments)
        if latest is not None and t <= latest:
            # Only another writer (a batch load with a later clock) can cause this; the algebra
            # needs t after every version it closes, so the record is kept aside, not misapplied.
            reason = f"system time {sql_timestamp(t)} is not after the key's latest version {sql_timestamp(latest)}"
            rows = [self._refused(event, reason)]
            applied = None
        else:
            assertion = tuple.__new__(
                Assertion, (None, event[EV_OP], event[EV_FROM], event[EV_TO], event[EV_PAYLOAD], event[EV_ID])
            )
            transaction = KeyTransaction(state, t)
            refused = transaction.apply(assertion, event[EV_DIGEST])
            applied = event[EV_ID] if transaction.applied else None
            if refused is not None:
                rows = [self._refused(event, refused)]
            elif transaction.applied:
                change = transaction.finish()
                changed_from, unchanged_tail = transaction.changed_from, transaction.unchanged_tail
                if change.opened:
                    latest = t
                elif change.closed:
                    latest = latest_system_from(segments)  # a delete: the latest may be gone
                # The twin-row layout of the batch loader (key and payload already their text).
                rows = [self._sink(row) for row in change_rows(event[EV_KEY], change, t)]
            else:
                rows = []  # a redelivery of an event id it already applied
        remember_event_ids(state, seen, applied, t, ttl_us)
        return rows, changed_from, unchanged_tail, latest

    def _refused(self, event: tuple[Any, ...], reason: str) -> SinkRow:
        return quarantine_row(self._quarantine, event[EV_SOURCE], event[EV_LINE], reason, event[EV_RAW], event[EV_T])


    def ledger(self, sha256: str, t: int) -> SinkRow:
        """The file-ledger row of a file published through the stream (`LEDGER_FIELD`)."""
        return self._sink(marker_row(None, t, FILE, f"{LEDGER_PREFIX}{sha256}"))

    def control(self, stable: int) -> SinkRow:
        """The row that publishes the dataset's stable system time (`system_from` = stable)."""
        return self._sink(marker_row(None, stable, CONTROL))

    def _sink(self, row: StoredRow) -> SinkRow:
        """A stored row (`chronolake.iceberg.twins`) whose key and payload are text, as a sink row;
        markers have neither."""
        key = row.key or self._empty_key
        payload = row.payload or self._empty_payload
        return SinkRow(self.spec.name, (*key, *payload, *row[2:6], row.row_kind, row.event_id, row.event_digest))


#: Segments, and remembered event ids, per map-state entry of a key's state (`StateCodec.write`):
#: ids in chunks of CHUNK by the order they were remembered; segments in chunks of CHUNK as a
#: timeline grows at its end, a chunk a change in the middle reaches rewritten alone (kept whole
#: up to 2 * CHUNK segments, else cut in chunks of CHUNK). Every transaction rewrites the key's
#: head (the segments and ids after the last stored chunk), which RocksDB then flushes and
#: compacts: at 20 versions per key, 4 wrote ~455 bytes per event, 8 ~626 and 32 ~1 KB. A state
#: stored in an earlier layout is read and rewritten in this one.
CHUNK = 4
#: entity + this + valid_from: the key's chunk of segments that starts there, with the valid_from
#: that starts the chunk before it (the head names the last one).
_SEGMENTS_FROM = "\x1fv"
_EVENTS_AT = "\x1fe"  # entity + this + n: the key's remembered ids of ordinals n*CHUNK .. (n+1)*CHUNK
_HEAD = 4  # the format of a head entry (an `M2` state is a 3-tuple, a head an 8-tuple)
#: The earlier head format: segments in chunks of `size` by position, `entity + "\x1fs" + n`.
_POSITIONAL_HEAD = 3
_POSITIONAL_AT = "\x1fs"


class Written:
    """What RocksDB holds of one key's state, as its stage last wrote or read it (`StateCodec.write`):
    the stored chunks of its segments (each one's end position among them), how many segments the
    state had, and the ordinals of its remembered event ids (each id gets the next ordinal when it
    is remembered; they are forgotten oldest first), with the last one's id and time, to find where
    the ids remembered since begin."""

    __slots__ = ("chunks", "ends", "count", "first", "end", "last_id", "last_t", "obsolete")

    def __init__(self) -> None:
        self.chunks: list[list[Segment]] = []
        self.ends: list[int] = []
        self.count = 0
        self.first = 0
        self.end = 0
        self.last_id: str | None = None
        self.last_t: int | None = None
        #: Entries of a state stored in an earlier layout: removed by the next write.
        self.obsolete: list[str] = []

    def ids(self, seen: dict[str, int], first: int, end: int) -> None:
        """RocksDB now holds the ids of `seen`, of ordinals `first` to `end`. Where the next write
        finds the ids remembered since matters only while some are stored apart from the head."""
        self.first, self.end = first, end
        if first // CHUNK != end // CHUNK:
            self.last_id = next(reversed(seen))
            self.last_t = seen[self.last_id]


class StateCodec:
    """A key's `KeyState` (payloads as text, `Texts`) as the job keeps it in RocksDB (`write`,
    `read`), or as text for the lookup service (`encode`, `decode`).

    In RocksDB a key's state is a head entry under its entity name, chunks of segments under the
    name with the valid_from of their first segment (each naming the one before, the head naming
    the last), and chunks of CHUNK remembered event ids under the name with their number, so that a
    checkpoint rewrites only what changed: the head (the last segments and ids) and the chunks a
    transaction changed, filled up or emptied, however long the timeline and wherever the change
    (chunks named by position moved, and were rewritten, with every segment inserted or removed
    before them); a short state is its head alone. `marshal` of plain tuples throughout. A head may
    also be a whole state in the earlier one-entry `M2` format (`dump`), or hold segments in chunks
    by position, as checkpoints of earlier versions hold; the key's next change rewrites it."""

    TAG = "M2:"

    def __init__(self, spec: DatasetSpec) -> None:
        self.texts = Texts(spec)

    def encode(self, state: KeyState, seen: dict[str, int] | None = None) -> str:
        """`state` with text payloads; `seen`: when each remembered event id was applied."""
        return self.TAG + base64.b64encode(self.dump(state, seen)).decode("ascii")

    def dump(self, state: KeyState, seen: dict[str, int] | None = None) -> bytes:
        """The whole state as one value (`M2`, what `encode` writes, as bytes). Its segments are
        plain tuples, as the algebra, `load` and `Texts.state` make them."""
        return marshal.dumps((state.segments, state.events, seen or {}), 4)

    def load(self, data: bytes) -> tuple[KeyState, dict[str, int]]:
        """The state `dump` wrote."""
        segments, events, seen = marshal.loads(data)
        return KeyState(segments, events), seen

    def encode_typed(self, state: KeyState) -> str:
        """A state read from the table (typed payloads), as `encode` writes it."""
        return self.encode(self.texts.state(state))

    def decode(self, text: str) -> tuple[KeyState, dict[str, int]]:
        if not text.startswith(self.TAG):
            raise ValueError(f"not a key state of this format ({self.TAG!r}): {text[:20]!r}")
        return self.load(base64.b64decode(text[len(self.TAG):]))

    def write(
        self, entity: str, state: KeyState, seen: dict[str, int], written: Written,
        unchanged: int = 0, unchanged_tail: int = 0,
    ) -> tuple[dict[str, bytes], list[str]]:
        """The map-state entries to put and to remove so that RocksDB holds `state` and `seen`, given
        that it holds `written` (updated to the new state). `seen` must name every id of
        `state.events` (`remember_event_ids` sees to that at every transaction). `unchanged` and
        `unchanged_tail`: the first and the last so many segments are those `written` holds
        (`KeyTransaction.changed_from` and `.unchanged_tail`): the chunks there are neither compared
        nor touched (most of a long timeline is cold in memory)."""
        puts: dict[str, bytes] = {}
        removes: list[str] = []
        tail = self._write_segments(entity, state.segments, written, unchanged, unchanged_tail, puts, removes)

        stored_from, stored_to = written.first // CHUNK, written.end // CHUNK
        if stored_from == stored_to:
            # No ids stored apart: their ordinals may start again from 0.
            first, end = 0, len(seen)
        else:
            end = written.end + _remembered_since(seen, written)
            first = end - len(seen)
        kept_from, kept_to = first // CHUNK, end // CHUNK  # the full chunks of ids, stored apart
        if kept_from == kept_to and stored_from == stored_to:
            tail_ids: tuple[dict[str, str], dict[str, int]] = (state.events, seen)  # all in the head
        else:
            removes += [f"{entity}{_EVENTS_AT}{n}" for n in range(stored_from, min(kept_from, stored_to))]
            for n in range(kept_from, kept_to):
                if n >= stored_to or (n == kept_from and first != written.first):
                    chunk_ids = _ids(state.events, seen, first, end, max(n * CHUNK, first), (n + 1) * CHUNK)
                    puts[f"{entity}{_EVENTS_AT}{n}"] = marshal.dumps(chunk_ids, 4)
            tail_ids = _ids(state.events, seen, first, end, max(kept_to * CHUNK, first), end)
        last = written.chunks[-1][0][0] if written.chunks else None
        puts[entity] = marshal.dumps((_HEAD, CHUNK, last, tail, first, end, *tail_ids), 4)
        if written.obsolete:
            removes += [name for name in written.obsolete if name not in puts]
            written.obsolete = []

        written.ids(seen, first, end)
        return puts, removes

    @staticmethod
    def _write_segments(
        entity: str, segments: list[Segment], written: Written, unchanged: int, unchanged_tail: int,
        puts: dict[str, bytes], removes: list[str],
    ) -> list[Segment]:
        """Rewrites the stored chunks the change reaches (the segments between the first `unchanged`
        and the last `unchanged_tail` ones), or, for a change after them (the usual: a new version
        after the last), stores the head's segments in chunks once there are CHUNK of them; adds
        the entries to `puts` and `removes`, updates `written`, and returns the segments after the
        last stored chunk, which the head holds."""
        chunks, ends = written.chunks, written.ends
        count = len(segments)
        shift = count - written.count  # where a segment after the change is now, minus where it was
        stored = ends[-1] if ends else 0  # the stored chunks' segments, then the head's
        if unchanged >= stored:
            tail = segments[stored:]
            while len(tail) >= CHUNK:  # a full chunk's worth: stored apart, naming the last one
                chunk, tail = tail[:CHUNK], tail[CHUNK:]
                puts[_chunk_name(entity, chunk)] = marshal.dumps((chunk, chunks[-1][0][0] if chunks else None), 4)
                chunks.append(chunk)
                ends.append((ends[-1] if ends else 0) + CHUNK)
            written.count = count
            return tail
        first = bisect_right(ends, unchanged)  # the stored chunk holding the first changed segment
        changed_to = written.count - unchanged_tail  # where the change ended then
        last = bisect_right(ends, changed_to - 1) if changed_to > unchanged else first
        begin = ends[first - 1] if first else 0
        if last >= len(chunks) - 1:
            # The change reaches the last stored chunk or the head's segments (a new version after
            # the last closes the last one): from chunk `first` on, in chunks of CHUNK.
            span = segments[begin:]
            made = [span[n:n + CHUNK] for n in range(0, len(span) - len(span) % CHUNK, CHUNK)]
            tail = span[len(made) * CHUNK:]
            resume = len(chunks)
        else:
            span = segments[begin:ends[last] + shift]
            # Chunks `first` to `last` changed: their segments now, as one chunk, or CHUNK at a time.
            step = max(len(span), 1) if len(span) <= 2 * CHUNK else CHUNK
            made = [span[n:n + step] for n in range(0, len(span), step)]
            tail = segments[stored + shift:]
            resume = last + 1
        before = chunks[first - 1][0][0] if first else None
        replaced = {chunk[0][0]: (chunk, chunks[first + n - 1][0][0] if first + n else None)
                    for n, chunk in enumerate(chunks[first:resume])}
        for chunk in made:
            if replaced.pop(chunk[0][0], None) != (chunk, before):
                puts[_chunk_name(entity, chunk)] = marshal.dumps((chunk, before), 4)
            before = chunk[0][0]
        removes += [f"{entity}{_SEGMENTS_FROM}{start}" for start in replaced]
        if resume < len(chunks) and chunks[resume - 1][0][0] != before:
            after = chunks[resume]  # it names the chunk before it, which is another one now
            puts[_chunk_name(entity, after)] = marshal.dumps((after, before), 4)
        made_ends = list(accumulate(map(len, made), initial=begin))[1:]
        ends_after = [end + shift for end in ends[resume:]] if shift else ends[resume:]
        written.chunks = [*chunks[:first], *made, *chunks[resume:]]
        written.ends = [*ends[:first], *made_ends, *ends_after]
        written.count = count
        return tail

    def read(
        self, entity: str, head: bytes, get: Callable[[str], bytes | None]
    ) -> tuple[KeyState, dict[str, int], Written] | None:
        """The state whose head entry is `head` (`get` reads the key's other entries), or None when
        a chunk is missing (expired by a state TTL before its head)."""
        data = marshal.loads(head)
        if len(data) == 3:  # `M2`: the whole state in one entry
            state, seen = self.load(head)
            return state, seen, Written()
        layout, size, start, tail, first, end, tail_events, tail_seen = data
        written = Written()
        segments: list[Segment] = []
        names: list[str] = []
        if layout == _POSITIONAL_HEAD:  # `start` is the number of chunks, of `size` segments each
            names = [f"{entity}{_POSITIONAL_AT}{n}" for n in range(start)]
            for name in names:
                chunk = get(name)
                if chunk is None:
                    return None
                segments += marshal.loads(chunk)
        else:  # `start`: the first valid_from of the last stored chunk, each naming the one before
            while start is not None:
                names.append(f"{entity}{_SEGMENTS_FROM}{start}")
                chunk = get(names[-1])
                if chunk is None:
                    return None
                stored, start = marshal.loads(chunk)
                written.chunks.append(stored)
            written.chunks.reverse()
            for stored in written.chunks:
                segments += stored
                written.ends.append(len(segments))
        segments += tail
        written.count = len(segments)
        if first // size == end // size:
            events, seen = tail_events, tail_seen
        else:
            events, seen = {}, {}
            for n in range(first // size, end // size):
                chunk = get(f"{entity}{_EVENTS_AT}{n}")
                if chunk is None:
                    return None
                chunk_events, chunk_seen = marshal.loads(chunk)
                events.update(chunk_events)
                seen.update(chunk_seen)
            events.update(tail_events)
            seen.update(tail_seen)
        if layout == _POSITIONAL_HEAD or size != CHUNK:
            # Written in an earlier layout or with ids in chunks of another size: the next write
            # stores the state in this one, as if RocksDB held none of it, and removes the old entries.
            fresh = Written()
            fresh.obsolete = names + [f"{entity}{_EVENTS_AT}{n}" for n in range(first // size, end // size)]
            return KeyState(segments, events), seen, fresh
        written.ids(seen, first, end)
        return KeyState(segments, events), seen, written


def _chunk_name(entity: str, chunk: list[Segment]) -> str:
    return f"{entity}{_SEGMENTS_FROM}{chunk[0][0]}"


def _remembered_since(seen: dict[str, int], written: Written) -> int:
    """How many ids `seen` has remembered since `written`: ids are remembered at the end and
    forgotten at the start, so the new ones follow the last one written, unless that one is gone
    too (then all are new). An id forgotten and remembered again has a later time."""
    last = written.last_id
    if last is None or seen.get(last) != written.last_t:
        return len(seen)
    count = 0
    for event_id in reversed(seen):
        if event_id == last:
            return count
        count += 1
    raise AssertionError("unreachable: the last written id is in `seen`")


def _ids(
    events: dict[str, str], seen: dict[str, int], first: int, end: int, start: int, stop: int
) -> tuple[dict[str, str], dict[str, int]]:
    """The digests and times of the remembered ids of ordinals `start` to `stop` (`seen` holds those
    of `first` to `end`, in order), read from whichever end of `seen` is nearer."""
    if end - start <= start - first:
        items = list(islice(reversed(seen.items()), end - start))
        items.reverse()
        del items[stop - start:]
    else:
        items = list(islice(seen.items(), start - first, stop - first))
    return {event_id: events[event_id] for event_id, _ in items}, dict(items)


def remember_event_ids(state: KeyState, seen: dict[str, int], applied: str | None, t: int, ttl_us: int) -> None:
    """Bounded dedup state: an event id is remembered for `ttl_us` of system time after the
    transaction that applied it (`applied`, or, for ids the key's state already had without a time,
    after the first transaction that found them); then it is forgotten, and a redelivery of it
    after that would be applied as a new event. System time, not the wall clock: a replay from a
    checkpoint forgets exactly what the first run forgot. Mutates both.

    `seen` is kept in the order ids were remembered, which is the order of their times (t only
    grows per key), so expiry looks only at its oldest entries."""
    events = state.events
    if len(seen) != len(events) - (applied is not None):
        for event_id in events.keys() - seen.keys():
            seen[event_id] = t
    elif applied is not None:
        seen[applied] = t
    horizon = t - ttl_us
    while seen:
        event_id, at = next(iter(seen.items()))
        if at > horizon:
            break
        del seen[event_id]
        events.pop(event_id, None)


def bundle_records(positions: str, log_times: str, lengths: str, payloads: bytes) -> Iterator[tuple[str, int, bytes]]:
    """The records of one bundle (`io.chronolake.flink.RecordBundler`): (position, log time ms,
    payload bytes) in the order the source delivered them."""
    end = 0
    for position, log_time, length in zip(positions.split(","), log_times.split(","), lengths.split(",")):
        start, end = end, end + int(length)
        yield position, int(log_time), payloads[start:end]


def key_bucket(entity: str, buckets: int) -> int:
    """The bucket a key's state lives under: stable across runs and processes (not `hash`)."""
    return zlib.crc32(entity.encode("utf-8", "surrogatepass")) % buckets


class ClockStage:
    """The partition clock over one bundle of a partition's records: system times in order,
    validation, quarantine rows, and the valid events grouped by key bucket."""

    def __init__(self, specs: dict[str, DatasetSpec], source: str, max_event_bytes: int, buckets: int) -> None:
        self.router = EventRouter(specs, max_event_bytes)
        self.source = source
        self.buckets = buckets

    def run(
        self, partition: int, last_t: int | None, records: Iterable[tuple[str, int, bytes]]
    ) -> tuple[int | None, dict[int, list[tuple[Any, ...]]], list[SinkRow]]:
        """(the partition's last t, events by bucket in partition order, rows for the tables)."""
        route, source_name, buckets = self.router.route, self.source, self.buckets
        events: dict[int, list[tuple[Any, ...]]] = {}
        rows: list[SinkRow] = []
        for position, log_time_ms, payload in records:
            t = log_time_ms * 1000
            if last_t is not None and t <= last_t:
                t = last_t + 1
            last_t = t
            source, line = record_source(source_name, partition, position)
            try:
                routed = route(payload.decode("utf-8"), source, line, t, len(payload))
            except UnicodeDecodeError:
                raw, undecodable = record_text(payload)
                routed = quarantine_row(UNROUTED_QUARANTINE, source, line, undecodable or "", raw, t)
            if type(routed) is Routed:
                event = routed.event
                bucket = key_bucket(event[EV_ENTITY], buckets)
                found = events.get(bucket)
                if found is None:
                    events[bucket] = [event]
                else:
                    found.append(event)
            else:
                rows.append(routed)  # type: ignore[arg-type]
        return last_t, events, rows


class Flushed(NamedTuple):
    """What `TimelineStage.flush` gives for one bucket: the map-state entries to put and to remove,
    and the keys (entities) whose states they are."""

    puts: dict[str, bytes]
    removes: list[str]
    entities: list[str]


class TimelineStage:
    """The keys' timelines over the events of one key bucket: one transaction per event, in order.

    `load(event)` gives the state of a key this stage does not hold (from RocksDB, the launch
    bootstrap or the table), with what RocksDB holds of it (`Written`). Decoded states stay in
    memory, the last `cache_keys` used and every one changed since its bucket was last flushed:
    this stage wrote them, and a restored or rescaled job opens a new stage, so they are exactly
    what RocksDB holds or will hold.

    A changed state is encoded right after its transaction (`StateCodec.write`, only its changed
    chunks), while its objects are still in the processor's cache: encoding it at the checkpoint
    mark instead, after thousands of other keys, cost several times more (the encoder then waits
    on memory for every object of the state). The entries wait, per bucket, for `flush(bucket)`."""

    def __init__(self, specs: dict[str, DatasetSpec], event_id_ttl_us: int, cache_keys: int) -> None:
        self.timelines = {name: EntityTimeline(spec) for name, spec in specs.items()}
        self.codecs = {name: StateCodec(spec) for name, spec in specs.items()}
        self.ttl_us = event_id_ttl_us
        self.cache_keys = cache_keys
        #: entity -> [dataset, state, seen, written, latest system_from], least recently used first.
        self.cache: dict[str, list[Any]] = {}
        #: bucket -> the entries to put and to remove, and the keys changed, since its last flush.
        self.pending: dict[int, tuple[dict[str, bytes], set[str], set[str]]] = {}
        self._changed_all: set[str] = set()

    def run(
        self,
        bucket: int,
        events: Iterable[tuple[Any, ...]],
        load: Callable[[tuple[Any, ...]], tuple[KeyState, dict[str, int], Written]],
    ) -> list[SinkRow]:
        """The rows of the events' transactions, for the tables."""
        cache, timelines, codecs, ttl = self.cache, self.timelines, self.codecs, self.ttl_us
        rows: list[SinkRow] = []
        pending = self.pending.get(bucket)
        if pending is None:
            pending = self.pending[bucket] = ({}, set(), set())
        puts, removes, changed = pending
        for event in events:
            entity = event[EV_ENTITY]
            entry = cache.pop(entity, None)
            if entry is None:
                state, seen, written = load(event)
                entry = [event[EV_DATASET], state, seen, written, latest_system_from(state.segments)]
            cache[entity] = entry  # most recently used last
            dataset, state, seen, written, latest = entry
            made, changed_from, unchanged_tail, entry[4] = timelines[dataset].transact(state, seen, event, ttl, latest)
            rows += made
            put, remove = codecs[dataset].write(entity, state, seen, written, changed_from, unchanged_tail)
            for name in remove:  # what a later write puts again is not removed, and the reverse
                puts.pop(name, None)
                removes.add(name)
            if removes:
                removes.difference_update(put)
            puts.update(put)
            changed.add(entity)
        self._changed_all |= changed
        self._trim()
        return rows

    def _trim(self) -> None:
        cache = self.cache
        while len(cache) > self.cache_keys:
            oldest = next(iter(cache))
            if oldest in self._changed_all:
                break  # the rest are recent; they leave once written
            del cache[oldest]

    def flush(self, bucket: int) -> Flushed:
        """What to write of the bucket's keys changed since its last flush."""
        puts, removes, changed = self.pending.pop(bucket, ({}, set(), set()))
        self._changed_all -= changed
        self._trim()
        return Flushed(puts, sorted(removes), sorted(changed))


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
