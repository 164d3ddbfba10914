"""The bitemporal streaming job: Kafka or Kinesis assertion events -> keyed timelines (RocksDB) -> Iceberg tables.

Runs by path in the job venv (`.venv/job/bin/python streaming/job.py ...`), started by
`chronolake.streaming.runtime.launch_stream_job`, which checks the topic or stream, writes the plan (dataset
declarations, partition count) and the state bootstrap, and sets `PYTHONPATH` so that this script
and the Python functions inside the mini-cluster import the pure `chronolake.iceberg` modules.

Pipeline (operator uids in brackets; they must never change, or restored state maps to nothing):

    Kafka or Kinesis table source (value, partition, position, log time; see sources.py)
    -> [record-bundler] (Java, streaming/java: no state) the records of each partition in bundles
         of up to BUNDLE_RECORDS records, at least every BUNDLE_MS, and always before a checkpoint
         barrier, followed then by a checkpoint mark per partition
    -> key by partition -> [partition-clock] per bundle, in partition order: t = max(log time,
         previous t + 1 us), then validation (`ClockStage`):
         bad records -> quarantine rows (side output of their table)
         good ones   -> grouped by key bucket (`key_bucket` of dataset and key, KEY_BUCKETS) ->
                        key by bucket -> [entity-timeline] one KeyTransaction per event on the key's
                        KeyState, kept in a RocksDB map state of the bucket (`TimelineStage`) ->
                        twin rows, event markers (side outputs)
         after each bundle: (partition, t) -> key by nothing -> [stable-time] min over partitions
                        of their high-water mark, published every --stable-interval-ms as a control
                        row per dataset (side outputs)
    -> per table: the union of its side outputs (JSON bundles of rows) -> [rows-<table>] (Java,
       `JsonRows`) one row per row, in the table's types -> Iceberg's Flink sink
       [iceberg-<table>-writer], [iceberg-<table>-committer] (`IcebergRows`: explicit uids, so the
       committer's state outlives changes elsewhere in the job)

Python is called once per bundle, not once per record: in thread mode each call into Python and
each row handed back costs more than most of what the job does with a record. The key states a
bundle changed stay decoded in the entity-timeline operator's memory, are encoded right after each
transaction (while in cache) and are written to RocksDB at the next checkpoint mark, which the
bundler sends before every barrier (aligned checkpoints), so a checkpoint holds every state change
of the records before it, each key's changed entries written once.

Each checkpoint is one Iceberg commit per table. A control row leaves the stable-time operator only
after the records it covers have left the partition clock, so it is committed with them or later:
a reader that sees stable time s sees every transaction with t <= s.
"""

from __future__ import annotations

import argparse
import gc
import json
import marshal
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.request
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
from pyflink.common import Configuration, Row, Types
from pyflink.common.time import Time
from pyflink.datastream import DataStream, KeyedProcessFunction, OutputTag, RuntimeContext, StreamExecutionEnvironment
from pyflink.datastream.state import MapState, MapStateDescriptor, StateTtlConfig, ValueState, ValueStateDescriptor
from pyflink.java_gateway import get_gateway
from pyflink.table import StreamTableEnvironment

from chronolake.iceberg.algebra import KeyState
from chronolake.iceberg.dataset import QUARANTINE_COLUMNS, QUARANTINE_SUFFIX, DatasetSpec
from chronolake.streaming.sources import KAFKA, KINESIS, RECORDS_QUERY, SOURCES, KafkaSource, KinesisSource
from chronolake.streaming.transactions import (
    EV_DATASET,
    EV_ENTITY,
    EV_RAW,
    UNROUTED_QUARANTINE,
    ClockStage,
    EntityTimeline,
    SinkRow,
    TimelineStage,
    Written,
    bundle_records,
    entity_id,
    micros_columns,
    stable_system_time,
)

CATALOG = "chronolake"
MAX_PARALLELISM = 128
#: Key buckets of the entity-timeline operator: a key's state lives under `key_bucket(entity)`.
#: Part of the state layout: changing it strands every key's state (like the operator uids).
KEY_BUCKETS = MAX_PARALLELISM
#: A bundle (`io.chronolake.flink.RecordBundler`) leaves after this many records or payload bytes,
#: or this many milliseconds, and always before a checkpoint barrier. Rows reach the table only with
#: a checkpoint, so holding records up to BUNDLE_MS costs little freshness, while every bundle is
#: split into up to KEY_BUCKETS calls of the entity timeline: 500 ms did 10.0k events/s where
#: 100 ms did 7.9k (bench/stream.py --events 400000 --bitemporal-only, side by side).
BUNDLE_RECORDS = 5000
BUNDLE_BYTES = 8 << 20
BUNDLE_MS = 500
#: Keys whose decoded state the entity-timeline operator keeps beside RocksDB (per subtask), besides
#: those changed since the last checkpoint.
DECODED_KEYS = 50_000
#: How long (hours of system time) an applied event id is remembered, unless --event-id-ttl-hours.
EVENT_ID_TTL_HOURS = 7 * 24

# Rows crossing between operators (thread mode drops field names, so they are positional).
BUNDLE = Types.ROW(
    [Types.INT(), Types.STRING(), Types.STRING(), Types.STRING(), Types.PRIMITIVE_ARRAY(Types.BYTE())]
)  # partition, positions, log times, payload lengths, payloads (a checkpoint mark: no positions)
EVENTS = Types.ROW([Types.INT(), Types.PRIMITIVE_ARRAY(Types.BYTE())])  # key bucket, marshal of events ("" = mark)
TICK = Types.ROW([Types.INT(), Types.LONG()])  # partition, t
TICK_TAG = OutputTag("ticks", TICK)
# A JSON array of one table's rows, UTF-8 (`io.chronolake.flink.JsonRows`): bytes cross into Java
# as a copy, where a str is converted character by character.
ROWS = Types.ROW_NAMED(["rows"], [Types.PRIMITIVE_ARRAY(Types.BYTE())])
#: The entity timeline holds the rows it makes until a checkpoint mark, or until it holds this many:
#: rows reach the tables only with a checkpoint anyway, and each bundle handed to Java costs about
#: as much as the rows of a small key bucket's call take to make.
HELD_ROWS = 20_000
_MARK = b""


def table_tags(specs: dict[str, str]) -> dict[str, OutputTag]:
    """One side output per Iceberg table, carrying JSON bundles of its rows."""
    names = [*specs, *(name + QUARANTINE_SUFFIX for name in specs), UNROUTED_QUARANTINE]
    return {table: OutputTag(f"table-{table}", ROWS) for table in sorted(names)}


class RowBundles:
    """Rows by table, handed on as one JSON bundle per table (`take`)."""

    def __init__(self) -> None:
        self.by_table: dict[str, list[tuple[Any, ...]]] = {}
        self.count = 0

    def add(self, rows: list[SinkRow]) -> None:
        by_table = self.by_table
        for row in rows:
            found = by_table.get(row.target)
            if found is None:
                by_table[row.target] = [row.values]
            else:
                found.append(row.values)
        self.count += len(rows)

    def take(self, tags: dict[str, OutputTag]) -> Iterator[tuple[OutputTag, Row]]:
        by_table, self.by_table, self.count = self.by_table, {}, 0
        for table, values in by_table.items():
            yield tags[table], Row(json_bundle(values))


def json_bundle(values: list[tuple[Any, ...]]) -> bytes:
    """One table's rows as `JsonRows` reads them: a JSON array of arrays, UTF-8."""
    try:
        return orjson.dumps(values)
    except orjson.JSONEncodeError:
        # A lone surrogate in a text (orjson refuses them): escaped, as Java strings hold them.
        return json.dumps(values, allow_nan=False).encode("ascii")


def _table_bundles(tags: dict[str, OutputTag], rows: list[SinkRow]) -> Iterator[tuple[OutputTag, Row]]:
    """`rows` as one JSON bundle per table."""
    bundles = RowBundles()
    bundles.add(rows)
    return bundles.take(tags)


class PartitionClock(KeyedProcessFunction):  # type: ignore[misc]
    """Keyed by source partition, one bundle of its records at a time (`ClockStage`): system times
    in partition order, validation, quarantine rows; valid events leave grouped by key bucket. The
    last t lives in keyed state, so a replay from a checkpoint assigns the same t."""

    def __init__(self, specs: dict[str, str], source: str, max_event_bytes: int, tags: dict[str, OutputTag]) -> None:
        self.specs = specs
        self.source = source
        self.max_event_bytes = max_event_bytes
        self.tags = tags
        self.last_t: ValueState | None = None
        self.stage: ClockStage | None = None
        self.sent: set[int] = set()  # buckets sent events since the last checkpoint mark

    def open(self, runtime_context: RuntimeContext) -> None:
        self.last_t = runtime_context.get_state(ValueStateDescriptor("last_system_time_us", Types.LONG()))
        specs = {name: DatasetSpec.from_json(name, text) for name, text in self.specs.items()}
        self.stage = ClockStage(specs, self.source, self.max_event_bytes, KEY_BUCKETS)

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        assert self.last_t is not None and self.stage is not None
        partition, positions, log_times, lengths, payloads = value
        if not positions:
            # A checkpoint mark: every bucket this operator sent events to writes its states now.
            for bucket in sorted(self.sent):
                yield Row(bucket, _MARK)
            self.sent.clear()
            return
        last, events, rows = self.stage.run(
            partition, self.last_t.value(), bundle_records(positions, log_times, lengths, bytes(payloads))
        )
        self.last_t.update(last)
        for bucket, bucket_events in events.items():
            yield Row(bucket, marshal.dumps(bucket_events, 4))
        self.sent.update(events)
        yield from _table_bundles(self.tags, rows)
        # The partition's high-water mark, after the records it covers.
        yield TICK_TAG, Row(partition, last)


class KeyTimeline(KeyedProcessFunction):  # type: ignore[misc]
    """Keyed by key bucket: the bucket's keys' `KeyState`s in a RocksDB map state (`StateCodec.write`),
    one transaction per event (`TimelineStage`). States changed since the last checkpoint mark are
    kept decoded in memory and their encoded entries are written at the next mark, which reaches
    this operator before the checkpoint barrier does; the rows made are held until then too (up to
    HELD_ROWS), whichever bucket's mark comes first: the tables see them with that checkpoint
    either way.

    A key the state has never known starts from the table's state at launch (the bootstrap file).
    With a state TTL (`state_ttl_ms`), a key idle that long loses its state; a `known` flag
    without TTL remembers that it existed, and its next record reads the key's state from the table
    through the lookup service (`chronolake.streaming.lookup`) instead: the table is the truth.
    """

    def __init__(
        self, specs: dict[str, str], bootstrap: str, tags: dict[str, OutputTag], event_id_ttl_us: int,
        state_ttl_ms: int = 0, lookup_url: str = "",
    ) -> None:
        self.specs = specs
        self.event_id_ttl_us = event_id_ttl_us
        self.state_ttl_ms = state_ttl_ms
        self.lookup_url = lookup_url
        self.bootstrap_path = bootstrap
        self.tags = tags
        self.states: MapState | None = None
        self.known: MapState | None = None
        self.stage: TimelineStage | None = None
        self.bootstrap: dict[str, KeyState] = {}
        self.held = RowBundles()  # rows made since the last checkpoint mark (HELD_ROWS)

    def open(self, runtime_context: RuntimeContext) -> None:
        # entity (and its chunks) -> `StateCodec.write`. PICKLED_BYTE_ARRAY: thread mode hands a
        # PRIMITIVE_ARRAY(BYTE) state value to Python as a tuple of ints (and fails on a missing one).
        descriptor = MapStateDescriptor("key_states", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
        if self.state_ttl_ms > 0:
            descriptor.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(self.state_ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnReadAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                .build()
            )
            self.known = runtime_context.get_map_state(MapStateDescriptor("key_known", Types.STRING(), Types.BOOLEAN()))
        self.states = runtime_context.get_map_state(descriptor)
        specs = {name: DatasetSpec.from_json(name, text) for name, text in self.specs.items()}
        # With a state TTL the states RocksDB expires must not live on in memory: keep only those
        # not yet written (every checkpoint writes them), so an idle key's next record reads RocksDB.
        self.stage = TimelineStage(specs, self.event_id_ttl_us, 0 if self.state_ttl_ms > 0 else DECODED_KEYS)
        if self.bootstrap_path:
            typed: dict[str, dict[Any, KeyState]] = pickle.loads(Path(self.bootstrap_path).read_bytes())
            self.bootstrap = {
                entity_id(dataset, key): state for dataset, states in typed.items() for key, state in states.items()
            }

    def process_element(self, value: Row, ctx: KeyedProcessFunction.Context) -> Iterable[Any]:
        assert self.stage is not None and self.states is not None
        bucket, blob = value
        if not blob:
            flushed = self.stage.flush(bucket)
            if flushed.puts:
                self.states.put_all(flushed.puts)
            for name in flushed.removes:
                self.states.remove(name)
            if self.known is not None and flushed.entities:
                self.known.put_all(dict.fromkeys(flushed.entities, True))
            settle_heap()
            # Every bucket this subtask was sent events to gets its mark before the barrier, so
            # nothing is held across a checkpoint.
            yield from self.held.take(self.tags)
            return
        self.held.add(self.stage.run(bucket, marshal.loads(bytes(blob)), self._load))
        if self.held.count >= HELD_ROWS:
            yield from self.held.take(self.tags)

    def _load(self, event: tuple[Any, ...]) -> tuple[KeyState, dict[str, int], Written]:
        assert self.states is not None and self.stage is not None
        entity, dataset = event[EV_ENTITY], event[EV_DATASET]
        codec = self.stage.codecs[dataset]
        head = self.states.get(entity)
        if head is not None:
            found = codec.read(entity, head, self.states.get)
            if found is not None:
                return found
            if self.known is None:
                raise RuntimeError(f"the key state of {entity!r} in RocksDB lacks a chunk its head names")
            # A chunk expired by the state TTL before its head: the whole state counts as expired.
        if self.known is not None and self.known.get(entity):
            return self._look_up(dataset, event[EV_RAW])  # expired by the state TTL: ask the table
        typed = self.bootstrap.get(entity)
        return (KeyState(), {}, Written()) if typed is None else (codec.texts.state(typed), {}, Written())

    def _look_up(self, dataset: str, raw: str) -> tuple[KeyState, dict[str, int], Written]:
        assert self.stage is not None
        body = json.dumps({"dataset": dataset, "record": json.loads(raw)}).encode()
        request = urllib.request.Request(self.lookup_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:  # a failure fails the task: it restarts
            text = response.read().decode("ascii")
        if not text:
            return KeyState(), {}, Written()
        # RocksDB may still hold chunks of the expired state: `Written()` rewrites every one in use.
        return (*self.stage.codecs[dataset].decode(text), Written())


#: `settle_heap` freezes the heap at most this often, and thaws it for one full collection this often
#: (seconds of processing time).
SETTLE_INTERVAL_S = 1.0
THAW_INTERVAL_S = 600.0
_settled = {"frozen": 0.0, "thawed": time.monotonic()}


def settle_heap() -> None:
    """Keeps the interpreter's cyclic garbage collector off the decoded key states (the timeline
    calls it at checkpoint marks). Those are millions of long-lived objects (each key's lists and
    dicts; its segments are plain tuples, which the collector stops tracking), and every full
    collection walked all of them again: a quarter of the timeline thread's Python time in a perf
    profile of `bench/stream.py` (when segments were `NamedTuple` instances, never untracked). At most every
    SETTLE_INTERVAL_S: collect, then move every object left into the permanent generation
    (`gc.freeze`), which later collections skip. Frozen objects are still freed when their last
    reference goes (the states hold no reference cycles); a cycle that was alive at a freeze and
    dropped after it is only collected at the next thaw, every THAW_INTERVAL_S (one full
    collection over everything), so what it can hold back is bounded. The interpreter is the
    TaskManager's, so this applies to every Python function it runs."""
    now = time.monotonic()
    if now - _settled["frozen"] < SETTLE_INTERVAL_S:
        return
    if now - _settled["thawed"] >= THAW_INTERVAL_S:
        gc.unfreeze()
        _settled["thawed"] = now
    gc.collect()
    gc.freeze()
    _settled["frozen"] = now


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
            yield from _table_bundles(self.tags, [timeline.control(stable) for timeline in self.timelines])
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
        # Compaction into level 1 only at 16 level-0 files (StateOptions: at RocksDB's 4, every
        # fourth checkpoint rewrote the whole key state); bloom filters, so that a read of a key not
        # held in memory skips the level-0 files without it.
        "state.backend.rocksdb.options-factory": "io.chronolake.flink.StateOptions",
        "state.backend.rocksdb.use-bloom-filter": "true",
        "execution.checkpointing.incremental": "true",
        "execution.checkpointing.interval": f"{args.checkpoint_interval_ms} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        # Aligned barriers: the checkpoint marks that make the operators write their in-memory
        # states into Flink state must reach them before the barrier (RecordBundler).
        "execution.checkpointing.unaligned.enabled": "false",
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
    # (payload, partition, position, log time ms), whichever the log (chronolake.streaming.sources).
    source = (
        KinesisSource(args.stream, args.region, args.endpoint or None)
        if args.source == KINESIS
        else KafkaSource(args.topic, args.bootstrap_servers, args.group_id)
    )
    t_env.execute_sql(source.ddl())
    records = t_env.to_data_stream(t_env.sql_query(RECORDS_QUERY))
    tags = table_tags(specs)
    jvm = get_gateway().jvm
    bundles = DataStream(
        records._j_data_stream.transform(
            "record-bundler", BUNDLE.get_java_type_info(),
            jvm.io.chronolake.flink.RecordBundler(BUNDLE_RECORDS, BUNDLE_BYTES, bundle_ms(args.idle_partition_ms)),
        ).uid("record-bundler")
    )
    clocked = (
        bundles.key_by(lambda r: r[0], key_type=Types.INT())
        .process(PartitionClock(specs, source.name, args.max_event_bytes, tags), output_type=EVENTS)
        .uid("partition-clock")
        .name("partition-clock")
    )
    versions = (
        clocked.key_by(lambda r: r[0], key_type=Types.INT())
        .process(
            KeyTimeline(
                specs, args.bootstrap, tags, args.event_id_ttl_hours * 3_600_000_000,
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

    catalog = _java_map(plan["catalog"])
    columns = {name: DatasetSpec.from_json(name, text).table_columns() for name, text in specs.items()}
    for table, tag in sorted(tags.items()):
        table_columns = columns.get(table, QUARANTINE_COLUMNS)
        bundled = clocked.get_side_output(tag).union(versions.get_side_output(tag), controls.get_side_output(tag))
        jvm.io.chronolake.flink.IcebergRows.append(
            bundled._j_data_stream, _java_strings([c.name for c in table_columns]),
            _java_strings(list(micros_columns(table))), CATALOG, catalog, namespace, table,
        )
    if args.jobmanager:
        # Detached: the cluster runs the job; `chronolake stream` follows and cancels it over REST.
        job_id = str(env.execute_async(args.job_name).get_job_id())
        Path(args.job_id_file).write_text(job_id)
        print(f"submitted job {job_id} to {args.jobmanager}")
        return
    env.execute(args.job_name)


def bundle_ms(idle_partition_ms: int) -> int:
    """How long the bundler may hold records: BUNDLE_MS, but well inside the idleness rule of the
    stable time (a partition whose ticks pause for `idle_partition_ms` is taken as caught up, so
    records held back that long could land below a stable time already published)."""
    return max(1, min(BUNDLE_MS, idle_partition_ms // 4))


def _java_map(values: dict[str, str]) -> Any:
    found = get_gateway().jvm.java.util.HashMap()
    for key, value in values.items():
        found.put(key, value)
    return found


def _java_strings(values: list[str]) -> Any:
    gateway = get_gateway()
    array = gateway.new_array(gateway.jvm.String, len(values))
    for index, value in enumerate(values):
        array[index] = value
    return array


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
        default=EVENT_ID_TTL_HOURS,
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
