"""The bitemporal job's sources: Kafka topics and Kinesis data streams as one Flink SQL table shape.

Imported by the job (job venv) and the launcher (tools env), so it uses only the standard library.

Whatever the log, the job reads four columns, in this order (`RECORDS_QUERY`):

| column | Kafka | Kinesis |
|---|---|---|
| `payload` BYTES | record value | record data |
| `source_partition` INT | partition | the shard's number: `shardId-000000000007` -> 7 |
| `source_position` STRING | offset (decimal text) | sequence number (up to ~56 decimal digits) |
| `log_time_ms` BIGINT | `LogAppendTime`, the broker's clock | approximate arrival time, the service's clock |

The payload stays bytes up to Python, which decodes it strictly (`transactions.record_text`): a
STRING column would turn bytes that are not UTF-8 into U+FFFD on the way, silently changing a key.

The position is text because a Kinesis sequence number does not fit a BIGINT. The shard number comes
from the shard id itself, which the service assigns once and never reuses within a stream: it stays
the same across restarts and resharding, so the partition clock's keyed state (last system time per
partition) always restores onto the same shard. An index into a list of shards taken at launch would
shift when a closed parent shard expires.

A record's coordinates in quarantine rows (`record_source`): `kafka:<topic>/<partition>@<offset>`
with `line` = offset, or `kinesis:<stream>/<shard id>@<sequence number>` with no `line`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from chronolake.streaming.catalog import with_clause

KAFKA = "kafka"
KINESIS = "kinesis"
SOURCES = (KAFKA, KINESIS)
SOURCE_TABLE = "source_records"
#: Shard ids as Kinesis (and its emulators) issue them; the number is the job's partition.
SHARD_ID = re.compile(r"shardId-(\d{12})")
SHARD_PREFIX = "shardId-"
#: What an emulator on loopback accepts; real AWS endpoints get the default credential chain.
EMULATOR_CREDENTIALS = ("chronolake", "chronolake")

# Epoch milliseconds: a TIMESTAMP would reach Python as an opaque Java object in thread mode.
_LOG_TIME_MS = "CAST(EXTRACT(EPOCH FROM log_time) AS BIGINT) * 1000 + EXTRACT(MILLISECOND FROM log_time)"

RECORDS_QUERY = f"""
SELECT payload, source_partition, source_position, {_LOG_TIME_MS} AS log_time_ms
FROM {SOURCE_TABLE}
"""


@dataclass(frozen=True)
class KafkaSource:
    topic: str
    bootstrap_servers: str
    group_id: str = "chronolake-stream"

    @property
    def name(self) -> str:
        return f"{KAFKA}:{self.topic}"

    def ddl(self) -> str:
        options = {
            "connector": "kafka",
            "topic": self.topic,
            "properties.bootstrap.servers": self.bootstrap_servers,
            "properties.group.id": self.group_id,
            "scan.startup.mode": "earliest-offset",
            "format": "raw",
        }
        return f"""
        CREATE TEMPORARY TABLE {SOURCE_TABLE} (
            payload BYTES,
            source_partition INT METADATA FROM 'partition' VIRTUAL,
            kafka_offset BIGINT METADATA FROM 'offset' VIRTUAL,
            source_position AS CAST(kafka_offset AS STRING),
            log_time TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
        ) WITH ({with_clause(options)})
        """


@dataclass(frozen=True)
class KinesisSource:
    """A Kinesis data stream read by the Flink Kinesis connector's table source (polling, no EFO)."""

    stream: str
    region: str
    #: None = the region's AWS endpoint; an `http://127.0.0.1:port` endpoint is an emulator.
    endpoint: str | None = None

    @property
    def name(self) -> str:
        return f"{KINESIS}:{self.stream}"

    def ddl(self) -> str:
        options = {
            "connector": "kinesis",
            "stream": self.stream,
            "aws.region": self.region,
            # From the oldest retained record, like the Kafka source's earliest-offset. After a
            # restore the connector continues from the sequence numbers in the checkpoint.
            "scan.stream.initpos": "TRIM_HORIZON",
            # Enhanced fan-out needs SubscribeToShard (HTTP/2 push), which emulators do not offer.
            "scan.stream.recordpublisher": "POLLING",
            "format": "raw",
        }
        if self.endpoint:
            options["aws.endpoint"] = self.endpoint
        credentials = emulator_credentials(self.endpoint)
        if credentials is None:
            options["aws.credentials.provider"] = "AUTO"
        else:
            options["aws.credentials.provider"] = "BASIC"
            options["aws.credentials.basic.accesskeyid"] = credentials[0]
            options["aws.credentials.basic.secretkey"] = credentials[1]
        return f"""
        CREATE TEMPORARY TABLE {SOURCE_TABLE} (
            payload BYTES,
            shard_id STRING METADATA FROM 'shard-id' VIRTUAL,
            source_position STRING METADATA FROM 'sequence-number' VIRTUAL,
            source_partition AS CAST(SUBSTRING(shard_id FROM {len(SHARD_PREFIX) + 1}) AS INT),
            log_time TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
        ) WITH ({with_clause(options)})
        """


def is_loopback(endpoint: str | None) -> bool:
    host = urlsplit(endpoint).hostname if endpoint else None
    return host in {"localhost", "127.0.0.1", "::1"}


def emulator_credentials(endpoint: str | None) -> tuple[str, str] | None:
    """Dummy credentials for an emulator on loopback (it accepts any); None = the default chain."""
    return EMULATOR_CREDENTIALS if is_loopback(endpoint) else None


def shard_number(shard_id: str) -> int:
    """`shardId-000000000007` -> 7 (the job's partition for the shard)."""
    match = SHARD_ID.fullmatch(shard_id)
    if match is None:
        raise ValueError(f"unexpected Kinesis shard id {shard_id!r} (expected shardId-<12 digits>)")
    return int(match.group(1))


def record_source(source: str, partition: int, position: str) -> tuple[str, int | None]:
    """A record's coordinates for quarantine rows: (`source`, `line`).

    `source` is `KafkaSource.name` or `KinesisSource.name`. Kafka: `kafka:<topic>/<partition>@<offset>`
    and the offset as line. Kinesis: `kinesis:<stream>/<shard id>@<sequence number>` and no line,
    since sequence numbers exceed a long; the sequence number is what `GetShardIterator` takes.
    """
    if source.startswith(KINESIS + ":"):
        return f"{source}/{SHARD_PREFIX}{partition:012d}@{position}", None
    return f"{source}/{partition}@{position}", int(position)
