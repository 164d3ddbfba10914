"""Plumbing job: Kafka -> Python (thread mode, RocksDB keyed state) -> Iceberg, on a mini-cluster.

Not the bitemporal job. It proves the runtime pieces the real job stands on fit together:
the Kafka table source with its metadata columns (partition, offset, log timestamp and its type),
Table <-> DataStream conversion, Python functions in thread mode, keyed state in RocksDB with
incremental checkpoints, and the Iceberg Flink sink appending per checkpoint to a table that the
Python tools created in the shared SQLite JDBC catalog.

Runs by path in the job venv (`.venv/job/bin/python streaming/plumbing_job.py ...`), which does
not have chronolake installed: besides PyFlink it imports chronolake's stdlib-only modules and the
bitemporal job's runtime configuration (`job.build_configuration`), which
`chronolake.streaming.runtime.JobRuntime` puts on `PYTHONPATH` (with the classpath).

Each Kafka record value is a JSON object with `key` (string) and `seq` (integer). Each output row
carries it with its Kafka coordinates and a per-partition system time
`max(log time, previous system time of the partition + 1 us)`, kept in keyed state.

Thread mode hands Python only what PEMJA converts: strings, numbers, booleans, bytes and rows,
arrays and maps of them. A TIMESTAMP arrives as an opaque `pemja.PyJObject`, so timestamps cross
the Python boundary as epoch milliseconds (in) and as `yyyy-MM-dd HH:mm:ss.ffffff` UTC strings
(out, because Flink 1.20's `TO_TIMESTAMP_LTZ` accepts only precision 0 or 3).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pyflink.common import Row, Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext, StreamExecutionEnvironment
from pyflink.datastream.state import ValueState, ValueStateDescriptor
from pyflink.table import StreamTableEnvironment

from chronolake.streaming.catalog import with_clause
from chronolake.streaming.job import build_configuration

CATALOG = "chronolake"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Flink casts this layout to TIMESTAMP(6) exactly; the session time zone (UTC) makes it an instant.
SQL_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"

PARSED = Types.ROW_NAMED(
    [
        "entity_key",
        "event_seq",
        "payload",
        "kafka_partition",
        "kafka_offset",
        "log_time_ms",
        "log_time_type",
        "udf_parent_pid",
    ],
    [
        Types.STRING(),
        Types.LONG(),
        Types.STRING(),
        Types.INT(),
        Types.LONG(),
        Types.LONG(),
        Types.STRING(),
        Types.INT(),
    ],
)
STAMPED = Types.ROW_NAMED(
    [*PARSED.get_field_names(), "system_from", "partition_seq"],
    [*PARSED.get_field_types(), Types.STRING(), Types.LONG()],
)


def parse_record(row: Row) -> Row:
    """Kafka value (JSON text) plus metadata -> one typed row (malformed input fails the job)."""
    # Positional: rows coming out of `to_data_stream` in thread mode carry no field names.
    payload, partition, offset, log_time_ms, log_time_type = row
    value = json.loads(payload)
    return Row(
        str(value["key"]),
        int(value["seq"]),
        payload,
        int(partition),
        int(offset),
        int(log_time_ms),
        str(log_time_type),
        # Evidence of thread mode: the function runs inside the gateway JVM, whose parent is this
        # script's process. In process mode it would run in a Beam worker started by the JVM.
        os.getppid(),
    )


class PartitionSystemTime(KeyedProcessFunction):  # type: ignore[misc]
    """Keyed by Kafka partition: system time moves forward by at least 1 us per record.

    Also counts the partition's records, so a restore that lost this state would show in the
    table as counts that no longer match the Kafka offsets.
    """

    def __init__(self) -> None:
        self.last_us: ValueState | None = None
        self.count: ValueState | None = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self.last_us = runtime_context.get_state(ValueStateDescriptor("last_system_time_us", Types.LONG()))
        self.count = runtime_context.get_state(ValueStateDescriptor("records_seen", Types.LONG()))

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Row]:
        assert self.last_us is not None and self.count is not None
        previous = self.last_us.value()
        t = value[5] * 1000  # log_time_ms; by position, see parse_record
        if previous is not None:
            t = max(t, previous + 1)
        self.last_us.update(t)
        seen = (self.count.value() or 0) + 1
        self.count.update(seen)
        yield Row(*value, (EPOCH + timedelta(microseconds=t)).strftime(SQL_TIMESTAMP_FORMAT), seen)


def run(args: argparse.Namespace) -> None:
    args.jobmanager = ""  # the bitemporal job's runtime configuration, on a local mini-cluster
    env = StreamExecutionEnvironment.get_execution_environment(build_configuration(args))
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    t_env.execute_sql(
        f"CREATE CATALOG {CATALOG} WITH ({with_clause(json.loads(Path(args.catalog).read_text()))})"
    )
    source = {
        "connector": "kafka",
        "topic": args.topic,
        "properties.bootstrap.servers": args.bootstrap_servers,
        "properties.group.id": args.group_id,
        "scan.startup.mode": "earliest-offset",
        "format": "raw",
    }
    if args.stop_offsets:
        source["scan.bounded.mode"] = "specific-offsets"
        source["scan.bounded.specific-offsets"] = ";".join(
            f"partition:{p},offset:{o}" for p, o in (part.split(":") for part in args.stop_offsets.split(","))
        )
    else:
        source["scan.bounded.mode"] = "latest-offset"
    t_env.execute_sql(
        f"""
        CREATE TEMPORARY TABLE kafka_source (
            payload STRING,
            kafka_partition INT METADATA FROM 'partition' VIRTUAL,
            kafka_offset BIGINT METADATA FROM 'offset' VIRTUAL,
            log_time TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL,
            log_time_type STRING METADATA FROM 'timestamp-type' VIRTUAL
        ) WITH ({with_clause(source)})
        """
    )
    records = t_env.to_data_stream(
        t_env.sql_query(
            """
            SELECT payload, kafka_partition, kafka_offset,
                   CAST(EXTRACT(EPOCH FROM log_time) AS BIGINT) * 1000
                       + EXTRACT(MILLISECOND FROM log_time) AS log_time_ms,
                   log_time_type
            FROM kafka_source
            """
        )
    )
    parsed = records.map(parse_record, output_type=PARSED).uid("parse").name("parse")
    stamped = (
        parsed.key_by(lambda r: r[3], key_type=Types.INT())
        .process(PartitionSystemTime(), output_type=STAMPED)
        .uid("partition-system-time")
        .name("partition-system-time")
    )
    t_env.create_temporary_view("stamped", t_env.from_data_stream(stamped))
    result = t_env.execute_sql(
        f"""
        INSERT INTO {CATALOG}.{args.table}
        SELECT entity_key, event_seq, payload, kafka_partition, kafka_offset,
               TO_TIMESTAMP_LTZ(log_time_ms, 3), log_time_type,
               CAST(CAST(system_from AS TIMESTAMP(6)) AS TIMESTAMP_LTZ(6)), udf_parent_pid,
               partition_seq
        FROM stamped
        """
    )
    result.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group-id", default="chronolake-plumbing")
    parser.add_argument(
        "--catalog", required=True, help="a JSON file of Iceberg catalog properties (chronolake.streaming.catalog)"
    )
    parser.add_argument("--table", required=True, help="namespace.table, created beforehand")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--checkpoint-interval-ms", type=int, default=2000)
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument(
        "--restart-attempts",
        type=int,
        default=0,
        help="restarts from the last checkpoint before the job fails (tests want the failure)",
    )
    parser.add_argument("--restore-from", default="", help="a retained checkpoint (chk-N folder)")
    parser.add_argument(
        "--stop-offsets",
        default="",
        help="partition:offset,... to stop at (exclusive); default: the latest offsets at start",
    )
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
