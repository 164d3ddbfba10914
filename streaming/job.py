"""The bitemporal streaming job: Kafka or Kinesis assertion events -> keyed timelines (RocksDB) -> Iceberg tables.

Runs by path in the job venv (`.venv/job/bin/python streaming/job.py ...`), started by
`chronolake.streaming.runtime.launch_stream_job`, which checks the topic or stream, writes the plan (dataset
declarations, partition count) and the state bootstrap, and sets `PYTHONPATH` so that this script
and the Python functions inside the mini-cluster import the pure `chronolake.iceberg` modules.

Pipeline (operator uids in brackets; they must never change, or restored state maps to nothing):

    Kafka or Kinesis table source (value, partition, position, log time; see sources.py)
    -> key by partition -> [partition-clock] t = max(log time, previous t + 1 us), then validate:
         bad records -> quarantine rows (side output of their table)
         good ones   -> key by (dataset, key) -> [entity-timeline] one KeyTransaction at t on the
                        key's KeyState (RocksDB) -> twin rows, event markers (side outputs)
         every TICK_MS per partition, on a timer: (partition, t) -> key by nothing -> [stable-time]
                        min over partitions of their high-water mark, published every
                        --stable-interval-ms as a control row per dataset (side outputs)
    -> per table: the union of its side outputs -> Flink SQL INSERT INTO the Iceberg table

Every Python operator sends a row straight to its table's typed side output, so a record crosses
the Python boundary in two operators (and their key selectors), whatever the number of tables.

Each checkpoint is one Iceberg commit per table. A control row leaves the stable-time operator only
after the records it covers have left the partition clock, so it is committed with them or later:
a reader that sees stable time s sees every transaction with t <= s.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.request
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pyflink.common import Configuration, Row, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext, StreamExecutionEnvironment
from pyflink.common.time import Time
from pyflink.datastream.state import StateTtlConfig, ValueState, ValueStateDescriptor
from pyflink.java_gateway import get_gateway
from pyflink.table import StreamTableEnvironment

from chronolake.iceberg.algebra import KeyState
from chronolake.iceberg.dataset import QUARANTINE_COLUMNS, QUARANTINE_SUFFIX, Column, DatasetSpec
from chronolake.streaming.catalog import catalog_properties, with_clause
from chronolake.streaming.sources import KAFKA, KINESIS, RECORDS_QUERY, SOURCES, KafkaSource, KinesisSource, record_source
from chronolake.streaming.transactions import (
    UNROUTED_QUARANTINE,
    EntityTimeline,
    EventRouter,
    Routed,
    SinkRow,
    StateCodec,
    insert_sql,
    quarantine_row,
    record_text,
    remember_event_ids,
    stable_system_time,
    system_time,
)

CATALOG = "chronolake"
MAX_PARALLELISM = 128

# Between the Python operators rows travel positionally (thread mode drops field names).
CLOCKED = Types.ROW(
    [Types.STRING(), Types.STRING(), Types.LONG(), Types.INT(), Types.STRING(), Types.STRING()]
)  # dataset, entity key text, t, partition, position (offset or sequence number), body
TICK = Types.ROW([Types.INT(), Types.LONG()])  # partition, t
TICK_TAG = OutputTag("ticks", TICK)
#: A partition's high-water mark goes to the stable-time operator at most this often (and always
#: after the records it covers), not once per record.
TICK_MS = 200
#: Keys whose decoded state the entity-timeline operator keeps beside RocksDB (per subtask).
DECODED_KEYS = 20_000


def table_tags(specs: dict[str, str]) -> dict[str, OutputTag]:
    """One side output per Iceberg table, typed as the table's columns (all text: `insert_sql` casts).
    Every operator sends each row straight to its table's side output: no routing stage after it."""
    tables: dict[str, Sequence[Column]] = {}
    for name, text in sorted(specs.items()):
        tables[name] = DatasetSpec.from_json(name, text).table_columns()
        tables[name + QUARANTINE_SUFFIX] = QUARANTINE_COLUMNS
    tables[UNROUTED_QUARANTINE] = QUARANTINE_COLUMNS
    return {
        table: OutputTag(f"table-{table}", Types.ROW_NAMED([c.name for c in columns], [Types.STRING()] * len(columns)))
        for table, columns in tables.items()
    }


def _tagged(tags: dict[str, OutputTag], row: SinkRow) -> tuple[OutputTag, Row]:
    return tags[row.target], Row(*row.values)


class PartitionClock(KeyedProcessFunction):  # type: ignore[misc]
    """Keyed by source partition: assigns each record its system time in partition order, then
    validates it. The last t lives in keyed state, so a replay from a checkpoint assigns the same t."""

    def __init__(self, specs: dict[str, str], source: str, max_event_bytes: int, tags: dict[str, OutputTag]) -> None:
        self.specs = specs
        self.source = source
        self.max_event_bytes = max_event_bytes
        self.tags = tags
        self.last_t: ValueState | None = None
        self.router: EventRouter | None = None
        self.tick_due: dict[int, int] = {}  # partition -> the tick timer already registered

    def open(self, runtime_context: RuntimeContext) -> None:
        self.last_t = runtime_context.get_state(ValueStateDescriptor("last_system_time_us", Types.LONG()))
        specs = {name: DatasetSpec.from_json(name, text) for name, text in self.specs.items()}
        self.router = EventRouter(specs, self.max_event_bytes)

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        assert self.last_t is not None and self.router is not None
        partition, position, log_time_ms = int(value[1]), str(value[2]), int(value[3])
        t = system_time(log_time_ms, self.last_t.value())
        self.last_t.update(t)
        source, line = record_source(self.source, partition, position)
        raw, undecodable = record_text(value[0])
        routed = (
            quarantine_row(UNROUTED_QUARANTINE, source, line, undecodable, raw, t)
            if undecodable is not None
            else self.router.route(raw, source, line, t)
        )
        if isinstance(routed, Routed):
            yield Row(routed.dataset, routed.entity, t, partition, position, raw)
        else:
            yield _tagged(self.tags, routed)
        # The partition's mark goes out on a timer at the next TICK_MS boundary: after this record,
        # at most once per boundary (Flink keeps one timer per key and time; restored with the state).
        due = (ctx.timer_service().current_processing_time() // TICK_MS + 1) * TICK_MS
        if self.tick_due.get(partition) != due:
            ctx.timer_service().register_processing_time_timer(due)
            self.tick_due[partition] = due

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterable[Any]:
        assert self.last_t is not None
        t = self.last_t.value()
        if t is not None:
            yield TICK_TAG, Row(int(ctx.get_current_key()), t)


class KeyTimeline(KeyedProcessFunction):  # type: ignore[misc]
    """Keyed by (dataset, key): the key's `KeyState` in RocksDB, one transaction per record.

    A key the state has never known starts from the table's state at launch (the bootstrap file).
    With a state TTL (`state_ttl_ms`), a key idle that long loses its state; a `key_known` flag
    without TTL remembers that it existed, and its next record reads the key's state from the table
    through the lookup service (`chronolake.streaming.lookup`) instead: the table is the truth.
    """

    def __init__(
        self, specs: dict[str, str], source: str, bootstrap: str, tags: dict[str, OutputTag], event_id_ttl_us: int,
        state_ttl_ms: int = 0, lookup_url: str = "",
    ) -> None:
        self.specs = specs
        self.event_id_ttl_us = event_id_ttl_us
        self.state_ttl_ms = state_ttl_ms
        self.lookup_url = lookup_url
        self.known: ValueState | None = None
        self.source = source
        self.bootstrap_path = bootstrap
        self.tags = tags
        self.state: ValueState | None = None
        self.timelines: dict[str, EntityTimeline] = {}
        self.codecs: dict[str, StateCodec] = {}
        self.bootstrap: dict[str, dict[Any, KeyState]] = {}
        # Decoded states of recently used keys with the text they were stored as: a key whose
        # RocksDB text is unchanged skips decoding (restored or rescaled state never matches).
        self.decoded: dict[tuple[str, str], tuple[str, KeyState, dict[str, int]]] = {}

    def open(self, runtime_context: RuntimeContext) -> None:
        # Text (`StateCodec`): thread mode fails to convert an empty BYTES state to Python.
        descriptor = ValueStateDescriptor("key_state", Types.STRING())
        if self.state_ttl_ms > 0:
            descriptor.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(self.state_ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnReadAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                .build()
            )
            self.known = runtime_context.get_state(ValueStateDescriptor("key_known", Types.BOOLEAN()))
        self.state = runtime_context.get_state(descriptor)
        specs = {name: DatasetSpec.from_json(name, text) for name, text in self.specs.items()}
        self.timelines = {name: EntityTimeline(spec) for name, spec in specs.items()}
        self.codecs = {name: StateCodec(spec) for name, spec in specs.items()}
        self.bootstrap = pickle.loads(Path(self.bootstrap_path).read_bytes()) if self.bootstrap_path else {}

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        assert self.state is not None
        dataset, entity, t, partition, position, raw = value
        timeline = self.timelines[dataset]
        codec = self.codecs[dataset]
        stored = self.state.value()
        seen: dict[str, int] = {}
        cache_key = (dataset, entity)
        cached = self.decoded.pop(cache_key, None)
        if stored is not None and cached is not None and cached[0] == stored:
            state, seen = cached[1], cached[2]  # the text in RocksDB is the one this object was encoded to
        elif stored is not None:
            state, seen = codec.decode(stored)
        elif self.known is not None and self.known.value():
            state, seen = self._look_up(dataset, raw)  # expired by the state TTL: ask the table
        else:
            key = timeline.parser.parse(json.loads(raw)).key
            state = self.bootstrap.get(dataset, {}).get(key) or KeyState()
        if self.known is not None and stored is None:
            self.known.update(True)
        source, line = record_source(self.source, partition, position)
        rows = timeline.apply(state, raw, source, line, t)
        remember_event_ids(state, seen, t, self.event_id_ttl_us)
        text = codec.encode(state, seen)
        self.state.update(text)
        self.decoded[cache_key] = (text, state, seen)
        if len(self.decoded) > DECODED_KEYS:
            del self.decoded[next(iter(self.decoded))]  # the least recently used
        for row in rows:
            yield _tagged(self.tags, row)


    def _look_up(self, dataset: str, raw: str) -> tuple[KeyState, dict[str, int]]:
        body = json.dumps({"dataset": dataset, "record": json.loads(raw)}).encode()
        request = urllib.request.Request(self.lookup_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:  # a failure fails the task: it restarts
            text = response.read().decode("ascii")
        return self.codecs[dataset].decode(text) if text else (KeyState(), {})


class StableTime(KeyedProcessFunction):  # type: ignore[misc]
    """One key for the whole job: each partition's high-water mark (the t of its latest record)
    and when it was last seen; every interval, when the stable system time (`stable_system_time`)
    has advanced, a control row per dataset publishes it."""

    def __init__(self, specs: dict[str, str], partitions: int, interval_ms: int, idle_ms: int, tags: dict[str, OutputTag]) -> None:
        self.specs = specs
        self.tags = tags
        self.partitions = partitions
        self.interval_ms = interval_ms
        self.idle_ms = idle_ms
        self.progress: ValueState | None = None
        self.timelines: list[EntityTimeline] = []

    def open(self, runtime_context: RuntimeContext) -> None:
        self.progress = runtime_context.get_state(ValueStateDescriptor("stable_progress", Types.STRING()))
        self.timelines = [EntityTimeline(DatasetSpec.from_json(n, s)) for n, s in sorted(self.specs.items())]

    def _load(self) -> dict[str, Any]:
        assert self.progress is not None
        text = self.progress.value()
        return json.loads(text) if text else {"marks": {}, "seen": {}, "published": None, "timer": False}

    def _schedule(self, progress: dict[str, Any], ctx: KeyedProcessFunction.Context) -> None:
        if not progress["timer"]:
            service = ctx.timer_service()
            service.register_processing_time_timer(service.current_processing_time() + self.interval_ms)
            progress["timer"] = True

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Row]:
        assert self.progress is not None
        progress = self._load()
        partition, t = str(value[0]), int(value[1])
        progress["marks"][partition] = max(t, progress["marks"].get(partition, t))
        progress["seen"][partition] = ctx.timer_service().current_processing_time()
        self._schedule(progress, ctx)
        self.progress.update(json.dumps(progress))
        return iter(())

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext) -> Iterable[Any]:
        assert self.progress is not None
        progress = self._load()
        progress["timer"] = False
        marks = {int(p): t for p, t in progress["marks"].items()}
        seen = {int(p): ms for p, ms in progress["seen"].items()}
        stable = stable_system_time(marks, seen, timestamp, self.partitions, self.idle_ms)
        if stable is not None and (progress["published"] is None or stable > progress["published"]):
            progress["published"] = stable
            for timeline in self.timelines:
                yield _tagged(self.tags, timeline.control(stable))
        if marks and progress["published"] != max(marks.values()):
            # Not everything is published yet: idleness may still release it without new records.
            self._schedule(progress, ctx)
        self.progress.update(json.dumps(progress))


def build_configuration(args: argparse.Namespace) -> Configuration:
    config = Configuration()
    settings = {
        "python.execution-mode": "thread",
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
        "state.backend.type": "rocksdb",
        "execution.checkpointing.incremental": "true",
        "execution.checkpointing.interval": f"{args.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.dir": Path(args.checkpoint_dir).resolve().as_uri(),
        "parallelism.default": str(args.parallelism),
        "pipeline.max-parallelism": str(MAX_PARALLELISM),
        "table.local-time-zone": "UTC",
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": str(args.restart_attempts),
        "restart-strategy.fixed-delay.delay": "1 s",
    }
    if args.restore_from:
        settings["execution.state-recovery.path"] = Path(args.restore_from).resolve().as_uri()
    if args.jobmanager:
        # Submitted to a session cluster's REST endpoint instead of a mini-cluster in this JVM. The
        # TaskManagers run the Python functions in an interpreter embedded in their JVM (thread
        # mode), which sees PyFlink only through `python.pythonpath` (the site-packages of the
        # workers' job venv) and chronolake through the shipped archive.
        host, port = args.jobmanager.rsplit(":", 1)
        settings.update({
            "execution.target": "remote",
            "rest.address": host,
            "rest.port": port,
            "pipeline.name": args.job_name,
            "python.executable": args.cluster_python or sys.executable,
            "python.pythonpath": worker_site_packages(args.cluster_python),
            "python.files": str(Path(args.python_files).resolve()),
        })
    for key, value in settings.items():
        config.set_string(key, value)
    return config


def worker_site_packages(python: str) -> str:
    """The site-packages of the workers' Python: this venv's own when they share its path, else the
    venv layout beside `python` (`<venv>/bin/python` -> `<venv>/lib/python3.X/site-packages`, same
    Python minor version as this client: the functions are pickled here and unpickled there)."""
    if not python:
        return sysconfig.get_paths()["purelib"]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(PurePosixPath(python).parent.parent / "lib" / version / "site-packages")


def execution_environment(config: Configuration) -> StreamExecutionEnvironment:
    """The environment `config` describes. `get_execution_environment` outside `flink run` always
    makes a local one (it overrides `execution.target` with `local`); the Java constructor honours
    the configured target, so `execution.target: remote` submits to the cluster's REST endpoint."""
    if config.get_string("execution.target", "local") == "local":
        return StreamExecutionEnvironment.get_execution_environment(config)
    jvm = get_gateway().jvm
    return StreamExecutionEnvironment(
        jvm.org.apache.flink.streaming.api.environment.StreamExecutionEnvironment(config._j_configuration)
    )


def run(args: argparse.Namespace) -> None:
    plan = json.loads(Path(args.plan).read_text())
    specs: dict[str, str] = plan["datasets"]
    namespace: str = plan["namespace"]
    env = execution_environment(build_configuration(args))
    t_env = StreamTableEnvironment.create(env)
    t_env.get_config().set("table.local-time-zone", "UTC")
    t_env.execute_sql(
        f"CREATE CATALOG {CATALOG} WITH ({with_clause(catalog_properties(Path(plan['home'])))})"
    )
    # (payload, partition, position, log time ms), whichever the log (chronolake.streaming.sources).
    source = (
        KinesisSource(args.stream, args.region, args.endpoint or None)
        if args.source == KINESIS
        else KafkaSource(args.topic, args.bootstrap_servers, args.group_id)
    )
    t_env.execute_sql(source.ddl())
    records = t_env.to_data_stream(t_env.sql_query(RECORDS_QUERY))
    tags = table_tags(specs)
    clocked = (
        records.key_by(lambda r: r[1], key_type=Types.INT())
        .process(PartitionClock(specs, source.name, args.max_event_bytes, tags), output_type=CLOCKED)
        .uid("partition-clock")
        .name("partition-clock")
    )
    versions = (
        clocked.key_by(lambda r: f"{r[0]}\x00{r[1]}", key_type=Types.STRING())
        .process(
            KeyTimeline(
                specs, source.name, args.bootstrap, tags, args.event_id_ttl_hours * 3_600_000_000,
                state_ttl_ms=args.state_ttl_ms, lookup_url=start_lookup(args, plan) if args.state_ttl_ms > 0 else "",
            ),
            output_type=Types.INT(),
        )
        .uid("entity-timeline")
        .name("entity-timeline")
    )
    stable = StableTime(specs, int(plan["partitions"]), args.stable_interval_ms, args.idle_partition_ms, tags)
    controls = (
        clocked.get_side_output(TICK_TAG)
        .key_by(lambda r: 0, key_type=Types.INT())
        .process(stable, output_type=Types.INT())
        .uid("stable-time")
        .name("stable-time")
    )

    statements = t_env.create_statement_set()
    columns = {name: DatasetSpec.from_json(name, text).table_columns() for name, text in specs.items()}
    for index, (table, tag) in enumerate(sorted(tags.items())):
        rows = clocked.get_side_output(tag).union(versions.get_side_output(tag), controls.get_side_output(tag))
        view = f"rows_{index}"
        t_env.create_temporary_view(view, t_env.from_data_stream(rows))
        statements.add_insert_sql(insert_sql(CATALOG, namespace, table, view, columns.get(table, QUARANTINE_COLUMNS)))
    result = statements.execute()
    if args.jobmanager:
        # Detached: the cluster runs the job; `chronolake stream` follows and cancels it over REST.
        job_id = str(result.get_job_client().get_job_id())
        Path(args.job_id_file).write_text(job_id)
        print(f"submitted job {job_id} to {args.jobmanager}")
        return
    result.wait()


def start_lookup(args: argparse.Namespace, plan: dict[str, Any]) -> str:
    """Start `chronolake.streaming.lookup` in the tools env (it exits with this process); its URL."""
    ready = Path(tempfile.mkdtemp(prefix="chronolake-lookup-")) / "port"
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}  # not the job venv's
    lookup = subprocess.Popen(
        [args.lookup_python, "-m", "chronolake.streaming.lookup", "--home", plan["home"], "--ready-file", str(ready)], env=env
    )
    deadline = time.monotonic() + 120
    while not ready.is_file() or not ready.read_text():
        if lookup.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the key-state lookup service did not start (exit code {lookup.poll()})")
        time.sleep(0.2)
    return f"http://127.0.0.1:{ready.read_text()}/state"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="plan.json written by runtime.prepare_stream_job")
    parser.add_argument("--bootstrap", default="", help="pickled {dataset: {key: KeyState}} from the tables")
    parser.add_argument("--source", choices=SOURCES, default=KAFKA, help="the log the assertion events arrive on")
    parser.add_argument("--bootstrap-servers", help="Kafka")
    parser.add_argument("--topic", help="Kafka")
    parser.add_argument("--group-id", default="chronolake-stream", help="Kafka")
    parser.add_argument("--stream", help="Kinesis: the data stream's name")
    parser.add_argument("--region", help="Kinesis: the stream's AWS region")
    parser.add_argument("--endpoint", default="", help="Kinesis: endpoint override (an emulator)")
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--checkpoint-interval-ms", type=int, default=2000)
    parser.add_argument(
        "--stable-interval-ms", type=int, default=1000, help="how often the stable system time is published"
    )
    parser.add_argument(
        "--idle-partition-ms",
        type=int,
        default=10_000,
        help="a partition without records this long no longer holds the stable system time back",
    )
    parser.add_argument("--max-event-bytes", type=int, default=1 << 20, help="longer events are quarantined")
    parser.add_argument(
        "--event-id-ttl-hours",
        type=int,
        default=7 * 24,
        help="how long (system time) an applied event id is remembered to ignore its redeliveries",
    )
    parser.add_argument(
        "--state-ttl-ms",
        type=int,
        default=0,
        help="drop a key's state after this long without a record (0: never); its next record reads the table",
    )
    parser.add_argument(
        "--lookup-python",
        default=str(Path(__file__).resolve().parent.parent / ".venv" / "tools" / "bin" / "python"),
        help="the tools env's interpreter, which runs the key-state lookup service (with --state-ttl-ms)",
    )
    parser.add_argument("--parallelism", type=int, default=1)
    parser.add_argument(
        "--restart-attempts",
        type=int,
        default=0,
        help="restarts from the last checkpoint before the job fails (tests want the failure)",
    )
    parser.add_argument("--restore-from", default="", help="a retained checkpoint (chk-N folder)")
    parser.add_argument(
        "--jobmanager", default="", help="HOST:PORT, a session cluster's REST endpoint (default: a local mini-cluster)"
    )
    parser.add_argument("--python-files", default="", help="with --jobmanager: the archive of chronolake's modules")
    parser.add_argument("--job-id-file", default="", help="with --jobmanager: where the submitted job's id goes")
    parser.add_argument("--job-name", default="chronolake-stream", help="the job's name on the cluster")
    parser.add_argument(
        "--cluster-python", default="", help="with --jobmanager: the job venv's Python on the workers (default: this one's path)"
    )
    args = parser.parse_args(argv)
    needed = ["bootstrap_servers", "topic"] if args.source == KAFKA else ["stream", "region"]
    missing = [f"--{name.replace('_', '-')}" for name in needed if not getattr(args, name)]
    if missing:
        parser.error(f"--source {args.source} needs {' and '.join(missing)}")
    if args.jobmanager and not (args.python_files and args.job_id_file and ":" in args.jobmanager):
        parser.error("--jobmanager HOST:PORT needs --python-files and --job-id-file")
    if args.jobmanager and args.state_ttl_ms > 0:
        # The lookup service runs beside this client, which exits once the cluster has the job.
        parser.error("--state-ttl-ms is not supported with --jobmanager yet (its key-state lookup service lives in the client)")
    run(args)


if __name__ == "__main__":
    main()
