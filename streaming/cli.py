"""`chronolake stream`, `chronolake produce` and `chronolake load --via-stream` (registered by
`chronolake.cli`). Errors a user can cause print as one line: they are raised as `ChronolakeError`."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from chronolake.iceberg.exceptions import ChronolakeError
from chronolake.iceberg.temporal import format_micros

DEFAULT_TOPIC = "chronolake-assertions"
err = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Service failures a user can cause or fix (no broker, missing topic, job env) as one line."""
    from kafka.errors import KafkaError

    from chronolake.streaming.broker import BrokerError
    from chronolake.streaming.cluster import ClusterError
    from chronolake.streaming.runtime import JobRuntimeError, StreamSourceError
    from chronolake.streaming.service import StreamServiceError

    try:
        yield
    except (BrokerError, ClusterError, JobRuntimeError, StreamSourceError, StreamServiceError) as error:
        raise ChronolakeError(str(error)) from None
    except KafkaError as error:
        raise ChronolakeError(f"Kafka: {type(error).__name__}: {error}".rstrip(": ")) from None


def stream(
    datasets: Annotated[list[str], typer.Argument(help="Datasets the job writes (it claims them: one writer per dataset).")],
    bootstrap_servers: Annotated[
        Optional[str],
        typer.Option("--bootstrap-servers", envvar="CHRONOLAKE_KAFKA", help="Kafka/MSK brokers; omit to start a local broker."),
    ] = None,
    topic: Annotated[str, typer.Option(help="The topic of assertion events.")] = DEFAULT_TOPIC,
    partitions: Annotated[int, typer.Option(min=1, help="Partitions, when the topic has to be created.")] = 2,
    checkpoint_interval_ms: Annotated[int, typer.Option(min=200, help="One Iceberg commit per table per checkpoint.")] = 2000,
    idle_partition_ms: Annotated[
        int, typer.Option(min=100, help="A partition silent this long no longer holds the stable system time back.")
    ] = 10_000,
    run_for: Annotated[Optional[float], typer.Option("--run-for", help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    every: Annotated[float, typer.Option("--every", help="Seconds between progress lines.")] = 5.0,
    release: Annotated[bool, typer.Option("--release", help="Give the datasets back (after stopping their job for good).")] = False,
    state_ttl_hours: Annotated[
        float,
        typer.Option(min=0, help="Drop a key's state after this long without a record (0: never); it is read back from the table."),
    ] = 0,
    jobmanager: Annotated[
        Optional[str],
        typer.Option(
            "--jobmanager",
            envvar="CHRONOLAKE_JOBMANAGER",
            help="HOST:PORT of a Flink 1.20 session cluster's REST endpoint: submit the job there (default: a local mini-cluster).",
        ),
    ] = None,
    cluster_python: Annotated[
        Optional[str],
        typer.Option(
            "--cluster-python",
            help="With --jobmanager: the job venv's Python on the TaskManagers (default: the path of this machine's .venv/job).",
        ),
    ] = None,
) -> None:
    """Run the streaming job (local Flink mini-cluster, or --jobmanager): Kafka -> bitemporal Iceberg tables, exactly once."""
    from chronolake.iceberg.ownership import release as release_claim
    from chronolake.lake import Lake
    from chronolake.streaming.service import StreamOptions, StreamService

    if state_ttl_hours and jobmanager:
        raise ChronolakeError("--state-ttl-hours works with the local mini-cluster only (its table lookup runs beside the job)")
    lake = Lake()
    if release:
        for name in datasets:
            owner = release_claim(lake.dataset(name).table.table)
            typer.echo(f"{name}: " + (f"released from {owner.describe()}" if owner else "was not claimed"))
        return
    options = StreamOptions(
        home=lake.settings.home,
        datasets=tuple(datasets),
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        partitions=partitions,
        checkpoint_interval_ms=checkpoint_interval_ms,
        idle_partition_ms=idle_partition_ms,
        jobmanager=jobmanager,
        cluster_python=cluster_python,
        state_ttl_ms=round(state_ttl_hours * 3_600_000),
    )
    with user_errors():
        service = StreamService(options)
    stop = _stop_on_signals()
    with user_errors():
        try:
            if bootstrap_servers is None and jobmanager is None:
                err.print("starting a local Kafka broker ...")
                err.print(f"local Kafka broker at {service.start_broker()} (this run only)")
            service.start()
            typer.echo(f"job started: topic {topic!r} at {service.bootstrap_servers} -> {', '.join(datasets)}")
            typer.echo(
                "resuming from checkpoint " + str(service.restored_from)
                if service.restored_from
                else "no checkpoint: starting from the tables' current state"
            )
            if service.job_id is not None:
                typer.echo(f"job {service.job_id} runs on the Flink cluster at {service.cluster.address} (web UI: {service.cluster.url});"
                           " stop with Ctrl-C (cancels it; checkpoints are kept)")
            else:
                typer.echo(f"job log: {service.log}; stop with Ctrl-C (checkpoints are kept)")
            _watch(service, lake, datasets, run_for, every, stop)
        finally:
            if service.job is not None or service.job_id is not None:
                err.print("stopping the job ...")
            service.stop()
    typer.echo("stopped")


def _stop_on_signals() -> list[bool]:
    stop = [False]

    def handler(signum: int, frame: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def _watch(service: Any, lake: Any, datasets: Sequence[str], run_for: float | None, every: float, stop: list[bool]) -> None:
    from kafka.errors import KafkaError

    started = last_at = time.monotonic()
    last_consumed: int | None = None
    while not stop[0] and (run_for is None or time.monotonic() - started < run_for):
        service.check_running()
        time.sleep(min(0.5, every))
        now = time.monotonic()
        if now - last_at < every:
            continue
        try:
            status = service.status()
        except KafkaError as error:
            typer.echo(f"progress unavailable: {type(error).__name__}")
            continue
        rate = 0.0 if last_consumed is None else (status.consumed - last_consumed) / (now - last_at)
        last_consumed, last_at = status.consumed, now
        stables = []
        for name in datasets:
            value = lake.dataset(name).stable_system_time()
            stables.append(f"{name} {format_micros(value) if value is not None else '-'}")
        typer.echo(
            f"consumed {status.consumed:,} events ({rate:,.0f}/s), lag {status.lag:,}; stable: " + ", ".join(stables)
        )


def _owner_stream(dataset: Any, bootstrap_servers: str | None, topic: str | None) -> tuple[str, str]:
    owner = dataset.stream_owner()
    if owner is None and (bootstrap_servers is None or topic is None):
        raise ChronolakeError(
            f"dataset {dataset.name!r} is not claimed by a streaming job: start one with "
            f"`chronolake stream {dataset.name}`, or give --bootstrap-servers and --topic"
        )
    if owner is not None and owner.source != "kafka":
        raise ChronolakeError(f"dataset {dataset.name!r} is written by {owner.describe()}; only Kafka publishing is built")
    return (bootstrap_servers or owner.address), (topic or owner.stream)


def publish_files(
    name: str,
    files: Sequence[Path],
    *,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    wait_s: float = 120.0,
    as_json: bool = False,
    valid_from_column: str | None = None,
    valid_to_column: str | None = None,
    kinesis_stream: str | None = None,
    region: str | None = None,
    endpoint: str | None = None,
) -> None:
    """Publish assertion files to the stream that writes the dataset; wait for the ledger entries."""
    from botocore.exceptions import BotoCoreError, ClientError

    from chronolake.batch_compat.readers import ColumnMapping
    from chronolake.lake import Lake
    from chronolake.streaming.feed import KafkaPublisher, KinesisPublisher, Publisher, wait_for_ledger
    from chronolake.streaming.feed import publish_files as publish
    from chronolake.streaming.kinesis import DEFAULT_REGION, KinesisError

    dataset = Lake().dataset(name)
    publisher: Publisher
    if kinesis_stream is not None:
        stream_topic, where = kinesis_stream, f"Kinesis stream {kinesis_stream!r}" + (f" at {endpoint}" if endpoint else "")
    else:
        servers, stream_topic = _owner_stream(dataset, bootstrap_servers, topic)
        where = f"{stream_topic!r} at {servers}"
    mapping = ColumnMapping(valid_from=valid_from_column or "valid_from", valid_to=valid_to_column or "valid_to")
    started = time.monotonic()
    try:
        with user_errors():
            try:
                publisher = (
                    KinesisPublisher(kinesis_stream, region or DEFAULT_REGION, endpoint)
                    if kinesis_stream is not None
                    else KafkaPublisher(servers, stream_topic)
                )
                with publisher:
                    results = publish(dataset.spec, files, publisher, dataset.table.loaded_files, mapping)
            except (KinesisError, BotoCoreError, ClientError) as error:
                raise ChronolakeError(str(error).splitlines()[0]) from None
    except ChronolakeError as error:
        raise ChronolakeError(f"publishing to {where}: {error} (is `chronolake stream {name}` running?)") from None
    published = sum(r.rows + r.ledger_entries for r in results if r.status == "published")
    elapsed = time.monotonic() - started
    ledger = wait_for_ledger(dataset, results, wait_s)
    if as_json:
        typer.echo(json.dumps({
            "topic": stream_topic,
            "published": published,
            "files": [
                {"path": str(r.path), "sha256": r.sha256, "rows": r.rows, "status": r.status,
                 "committed_at": format_micros(ledger[r.sha256]) if r.sha256 in ledger else None}
                for r in results
            ],
        }))
        return
    for r in results:
        detail = f"{r.rows} rows published" + (f" ({r.rejected} malformed, quarantined by the job)" if r.rejected else "")
        if r.status != "published":
            detail = r.status
        elif r.sha256 in ledger:
            detail += f"; committed by the job at {format_micros(ledger[r.sha256])}"
        else:
            detail += "; not committed yet (is `chronolake stream` running?)"
        typer.echo(f"{r.path}: {detail}")
    typer.echo(f"{published:,} events to {stream_topic!r} in {elapsed:.2f}s ({published / max(elapsed, 1e-9):,.0f}/s)")
    if any(r.sha256 in ledger for r in results):
        typer.echo(f"quarantined rows, if any: chronolake quarantine {name}")


def publish_demo_feed(name: str, count: int, rate: float | None, *, bootstrap_servers: str | None, topic: str | None) -> None:
    """`count` events of `demo_feed.feed` to the dataset's stream, at `rate` per second, with progress."""
    import itertools

    from chronolake.lake import Lake
    from chronolake.streaming.demo_feed import check_dataset, feed
    from chronolake.streaming.feed import KafkaPublisher

    dataset = Lake().dataset(name)
    if (problem := check_dataset(dataset.spec)) is not None:
        raise ChronolakeError(problem)
    servers, stream_topic = _owner_stream(dataset, bootstrap_servers, topic)
    started = time.monotonic()
    last = [started]

    def paced() -> Iterator[tuple[bytes, bytes]]:
        for n, item in enumerate(itertools.islice(feed(name), count)):
            if rate is not None and (ahead := started + n / rate - time.monotonic()) > 0:
                time.sleep(ahead)
            yield item

    def progress(n: int) -> None:
        if time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            typer.echo(f"published {n:,} events ({n / (last[0] - started):,.0f}/s)")

    with user_errors(), KafkaPublisher(servers, stream_topic) as publisher:
        published = publisher.publish(paced(), progress)
    elapsed = time.monotonic() - started
    typer.echo(f"{published:,} demo-feed events to {stream_topic!r} in {elapsed:.1f}s ({published / max(elapsed, 1e-9):,.0f}/s)")


def produce(
    name: Annotated[str, typer.Argument(help="The dataset the files' assertions belong to.")],
    files: Annotated[Optional[list[Path]], typer.Argument(help="CSV, JSONL or Parquet files, optionally .gz, in order.")] = None,
    demo_feed: Annotated[
        Optional[int], typer.Option("--demo-feed", min=1, help="Instead of files: this many events of a realistic index-level feed.")
    ] = None,
    rate: Annotated[Optional[float], typer.Option(min=1, help="--demo-feed: events per second (default: as fast as possible).")] = None,
    bootstrap_servers: Annotated[
        Optional[str], typer.Option("--bootstrap-servers", envvar="CHRONOLAKE_KAFKA", help="Default: the dataset's stream.")
    ] = None,
    topic: Annotated[Optional[str], typer.Option(help="Default: the topic of the job that owns the dataset.")] = None,
    kinesis_stream: Annotated[
        Optional[str], typer.Option("--kinesis-stream", help="Publish to this Kinesis data stream instead of Kafka.")
    ] = None,
    region: Annotated[Optional[str], typer.Option(help="Kinesis: the stream's AWS region (default us-east-1).")] = None,
    endpoint: Annotated[Optional[str], typer.Option(help="Kinesis: endpoint override (an emulator).")] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the job to commit each file's ledger entry.")] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with the outcome.")] = False,
) -> None:
    """Publish files as assertion events to Kafka or Kinesis (one JSON event per row, keyed by dataset and key)."""
    if (demo_feed is None) == (not files):
        raise ChronolakeError("give files to publish, or --demo-feed N (not both)")
    if demo_feed is not None:
        if kinesis_stream is not None:
            raise ChronolakeError("--demo-feed publishes to Kafka only")
        publish_demo_feed(name, demo_feed, rate, bootstrap_servers=bootstrap_servers, topic=topic)
        return
    assert files is not None
    publish_files(
        name, files, bootstrap_servers=bootstrap_servers, topic=topic, wait_s=wait, as_json=as_json,
        kinesis_stream=kinesis_stream, region=region, endpoint=endpoint,
    )
