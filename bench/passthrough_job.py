"""The streaming benchmark's baseline: the bitemporal job's source and sink with nothing in between.

Same Kafka source table (`chronolake.streaming.sources`), same runtime configuration (thread mode,
RocksDB, checkpoint interval: `chronolake.streaming.job.build_configuration`), same Iceberg Flink
sink (`FlinkSink`; here behind Flink SQL's `INSERT INTO`, which the bitemporal job builds directly
with fixed uids) through the same JDBC catalog; in between one identity Python map (the record decoded to text)
and a plain append of (payload, partition, position, log time) to one table. Run by bench/stream.py
in the job venv, like the real job.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pyflink.common import Row, Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.table import StreamTableEnvironment

from chronolake.streaming.catalog import with_clause
from chronolake.streaming.job import CATALOG, build_configuration
from chronolake.streaming.sources import RECORDS_QUERY, KafkaSource

NAMES = ["payload", "source_partition", "source_position", "log_time_ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group-id", default="chronolake-passthrough")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--checkpoint-interval-ms", type=int, default=2000)
    parser.add_argument("--parallelism", type=int, default=1)
    args = parser.parse_args()
    # The fields build_configuration reads, as the bitemporal job has them by default (a local run).
    args.restart_attempts, args.restore_from, args.jobmanager = 20, "", ""
    plan = json.loads(Path(args.plan).read_text())

    env = StreamExecutionEnvironment.get_execution_environment(build_configuration(args))
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    t_env.execute_sql(f"CREATE CATALOG {CATALOG} WITH ({with_clause(plan['catalog'])})")
    t_env.execute_sql(KafkaSource(args.topic, args.bootstrap_servers, args.group_id).ddl())
    records = t_env.to_data_stream(t_env.sql_query(RECORDS_QUERY))
    identity = records.map(
        lambda r: Row(bytes(r[0]).decode("utf-8", "replace"), r[1], r[2], r[3]),
        output_type=Types.ROW_NAMED(NAMES, [Types.STRING(), Types.INT(), Types.STRING(), Types.LONG()]),
    ).name("identity")
    t_env.create_temporary_view("rows_out", t_env.from_data_stream(identity))
    t_env.execute_sql(
        f"INSERT INTO {CATALOG}.`{plan['namespace']}`.`{args.table}` SELECT {', '.join(NAMES)} FROM rows_out"
    ).wait()


if __name__ == "__main__":
    main()
