"""One writer per dataset: which streaming job owns a dataset's table, recorded on the table itself.

DESIGN §1: a dataset has one writer. A streaming job claims its datasets before it starts by setting
the table property `chronolake.stream-owner` (the stream it reads: Kafka bootstrap servers and
topic, or a Kinesis stream). While the property is set, a direct batch load is refused with a
message naming the stream, and `chronolake load --via-stream` publishes the file to that stream
instead. The claim survives the job's restarts (it resumes from its checkpoints); `chronolake
stream release` removes it once the job is stopped for good.

The property lives in the table's metadata, so every catalog (SQLite, Postgres, Glue) carries it and
a reader of the lake sees who writes it. Setting it is a metadata-only commit (no snapshot).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from pyiceberg.table import Table

from chronolake.iceberg.exceptions import ChronolakeError
from chronolake.iceberg.temporal import format_micros

OWNER_PROPERTY = "chronolake.stream-owner"


class DatasetOwned(ChronolakeError):
    """A write that the dataset's owning streaming job must make instead."""


@dataclass(frozen=True)
class StreamOwner:
    """The stream whose job writes a dataset."""

    source: str  # "kafka" or "kinesis"
    stream: str  # the topic or the Kinesis stream name
    address: str  # Kafka bootstrap servers, or the Kinesis endpoint ("" for AWS's own)
    since: int = 0  # micros since the epoch, when it was claimed

    def describe(self) -> str:
        where = f" at {self.address}" if self.address else ""
        return f"the streaming job reading {self.source} {self.stream!r}{where}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StreamOwner:
        fields = json.loads(text)
        return cls(str(fields["source"]), str(fields["stream"]), str(fields.get("address", "")), int(fields.get("since", 0)))


def stream_owner(table: Table) -> StreamOwner | None:
    text = table.properties.get(OWNER_PROPERTY)
    return StreamOwner.from_json(text) if text else None


def claim(table: Table, owner: StreamOwner) -> StreamOwner:
    """Make `owner` the dataset's writer; the current owner if it is the same stream (any address)."""
    current = stream_owner(table)
    if current is not None:
        if (current.source, current.stream) != (owner.source, owner.stream):
            raise DatasetOwned(
                f"dataset {table.name()[-1]!r} is already written by {current.describe()} "
                f"(since {format_micros(current.since)}); release it first: chronolake stream {table.name()[-1]} --release"
            )
        if current.address == owner.address:
            return current
    claimed = StreamOwner(owner.source, owner.stream, owner.address, owner.since or int(time.time() * 1_000_000))
    with table.transaction() as transaction:
        transaction.set_properties({OWNER_PROPERTY: claimed.to_json()})
    return claimed


def release(table: Table) -> StreamOwner | None:
    """Remove the claim; returns the owner it removed (None if there was none)."""
    current = stream_owner(table)
    if current is not None:
        with table.transaction() as transaction:
            transaction.remove_properties(OWNER_PROPERTY)
    return current


def refuse_direct_write(table: Table, what: str = "a batch load") -> None:
    """Raise `DatasetOwned` when a streaming job owns the table."""
    owner = stream_owner(table)
    if owner is not None:
        name = table.name()[-1]
        raise DatasetOwned(
            f"dataset {name!r} is written by {owner.describe()}: {what} would be a second writer; "
            f"publish through the job with `chronolake load {name} FILE --via-stream`, "
            f"or `chronolake stream {name} --release` once the job is stopped for good"
        )
