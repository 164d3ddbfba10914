"""Running the bitemporal streaming job for a user: `chronolake stream` and the streaming demo.

`StreamService` does what an operator would do by hand, in order:

1. without bootstrap servers, start a fresh single-node Kafka broker as a local process (a laptop
   run: its topic and the job's checkpoints last as long as the run; the tables keep everything);
2. make sure the topic exists and stamps records with the broker's clock (`LogAppendTime`);
   create it so if it is missing;
3. claim the datasets for this stream (`chronolake.iceberg.ownership`): from now on a direct batch
   load into them is refused and `chronolake load --via-stream` publishes here;
4. start the job (`runtime.launch_stream_job`), resuming from the newest retained checkpoint in
   its work folder, so a stopped job picks up where it stopped, exactly once: on a local Flink
   mini-cluster in the job's own process, or (`jobmanager`) submitted to a Flink session cluster,
   which then runs it without us (`chronolake.streaming.cluster`);
5. report progress (`status`): records consumed per partition (the offsets the job commits to
   Kafka with each checkpoint), lag, throughput, and each dataset's stable system time;
6. stop the job (SIGTERM to its process group, then SIGKILL; on a cluster: cancel it over REST),
   then the broker. The checkpoints stay.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import CoordinatorNotAvailableError, GroupIdNotFoundError, TopicAlreadyExistsError

from chronolake.iceberg.ownership import StreamOwner, claim
from chronolake.lake import Lake
from chronolake.streaming.broker import BrokerSettings, LocalKafkaBroker
from chronolake.streaming.cluster import SessionCluster
from chronolake.streaming.runtime import LOG_APPEND_TIME, JobRuntime, StreamJobSettings, job_catalog, launch_stream_job

DEFAULT_TOPIC = "chronolake-assertions"


class StreamServiceError(Exception):
    """The job could not be started or stopped running."""


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete retained checkpoint (`<job id>/chk-N` with its `_metadata`); ids continue
    across restores, so the highest N is the newest."""
    completed = [chk for chk in checkpoints.glob("*/chk-*") if (chk / "_metadata").is_file()]
    return max(completed, key=lambda chk: int(chk.name.removeprefix("chk-")), default=None)


def ensure_topic(bootstrap_servers: str, topic: str, partitions: int) -> bool:
    """Create the topic with `LogAppendTime` if it does not exist; True if it was created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        if topic in admin.list_topics():
            return False
        try:
            admin.create_topics(
                [NewTopic(topic, num_partitions=partitions, replication_factor=1,
                          topic_configs={"message.timestamp.type": LOG_APPEND_TIME})]
            )
        except TopicAlreadyExistsError:
            return False
        return True
    finally:
        admin.close()


@dataclass(frozen=True)
class StreamOptions:
    home: Path
    datasets: tuple[str, ...]
    bootstrap_servers: str | None = None  # None: start a local broker
    topic: str = DEFAULT_TOPIC
    partitions: int = 2  # when the topic has to be created
    work_dir: Path | None = None  # default: <home>/stream/<topic>
    checkpoint_interval_ms: int = 2000
    idle_partition_ms: int = 10_000
    parallelism: int = 1
    restart_attempts: int = 100  # restarts from the last checkpoint (exactly once) before giving up
    state_ttl_ms: int = 0  # 0: key state never expires
    group_id: str = "chronolake-stream"
    #: `HOST:PORT` of a Flink session cluster's REST endpoint; None: a local mini-cluster. The
    #: cluster must see the lake home (catalog, warehouse, checkpoints) at the same path.
    jobmanager: str | None = None
    #: The job venv's Python on the cluster's workers (same Python minor version); None = the
    #: same path as this machine's job venv.
    cluster_python: str | None = None

    @property
    def folder(self) -> Path:
        return self.work_dir or self.home / "stream" / self.topic

    @property
    def job_name(self) -> str:
        return f"chronolake-stream {self.topic} -> {','.join(self.datasets)}"


@dataclass
class PartitionProgress:
    consumed: int  # offset committed by the job (records before it are in Iceberg or in flight)
    end: int  # the partition's log end offset


@dataclass
class StreamStatus:
    partitions: dict[int, PartitionProgress] = field(default_factory=dict)

    @property
    def consumed(self) -> int:
        return sum(p.consumed for p in self.partitions.values())

    @property
    def lag(self) -> int:
        return sum(max(p.end - p.consumed, 0) for p in self.partitions.values())


class StreamService:
    def __init__(self, options: StreamOptions, runtime: JobRuntime | None = None) -> None:
        self.options = options
        self.runtime = runtime or JobRuntime()
        self.broker: LocalKafkaBroker | None = None
        self.job: subprocess.Popen[bytes] | None = None
        self.restored_from: Path | None = None
        self.log_start = 0  # where this run's part of the job log begins
        self.created_topic = False
        self.cluster = SessionCluster.parse(options.jobmanager) if options.jobmanager else None
        self.job_id: str | None = None  # the job on the cluster
        self.lake = Lake(options.home)
        job_catalog(self.lake.settings)  # a catalog the job cannot open fails now, not after a broker started

    @property
    def bootstrap_servers(self) -> str:
        if self.broker is not None:
            return self.broker.bootstrap_servers
        if self.options.bootstrap_servers is None:
            raise StreamServiceError("no Kafka bootstrap servers (give --bootstrap-servers or --local-broker)")
        return self.options.bootstrap_servers

    @property
    def log(self) -> Path:
        return self.options.folder / "job.log"

    def start_broker(self) -> str:
        """A fresh local broker for this run. Its topic starts empty, so the job must not resume
        from checkpoints of an earlier broker: they go too, and the job starts from the tables
        (the truth; the job's state is their cache), event-id dedup state included."""
        for stale in ("kafka", "checkpoints"):
            shutil.rmtree(self.options.folder / stale, ignore_errors=True)
        self.broker = LocalKafkaBroker(
            BrokerSettings(data_dir=self.options.folder / "kafka", default_partitions=self.options.partitions)
        )
        self.broker.start()
        return self.broker.bootstrap_servers

    def start(self) -> None:
        """Steps 1-4 of the module docstring (the broker only if none is given)."""
        options = self.options
        datasets = [self.lake.dataset(name) for name in options.datasets]  # fails clearly on a typo
        if self.cluster is not None:
            self.cluster.check()
            if options.bootstrap_servers is None:
                raise StreamServiceError("a job on a Flink cluster needs --bootstrap-servers (it cannot reach this run's local broker)")
            running = [job for job in self.cluster.jobs() if job.name == options.job_name and not job.finished]
            if running:
                raise StreamServiceError(
                    f"{options.job_name!r} already runs on the cluster at {self.cluster.address} as job "
                    f"{running[0].id} ({running[0].state}); cancel it there first"
                )
        if self.options.bootstrap_servers is None and self.broker is None:
            self.start_broker()
        self.created_topic = ensure_topic(self.bootstrap_servers, options.topic, options.partitions)
        owner = StreamOwner("kafka", options.topic, self.bootstrap_servers)
        for dataset in datasets:
            claim(dataset.table.table, owner)
        self.restored_from = latest_checkpoint(options.folder / "checkpoints")
        settings = StreamJobSettings(
            home=options.home,
            datasets=list(options.datasets),
            bootstrap_servers=self.bootstrap_servers,
            topic=options.topic,
            work_dir=options.folder,
            group_id=options.group_id,
            checkpoint_interval_ms=options.checkpoint_interval_ms,
            idle_partition_ms=options.idle_partition_ms,
            restart_attempts=options.restart_attempts,
            restore_from=self.restored_from,
            state_ttl_ms=options.state_ttl_ms,
            jobmanager=self.cluster.address if self.cluster else None,
            job_name=options.job_name,
            cluster_python=options.cluster_python,
        )
        log_start = self.log_start = self.log.stat().st_size if self.log.is_file() else 0
        self.job = launch_stream_job(settings, self.log, self.runtime)
        if self.cluster is not None:
            self.job_id = self._submitted(settings.job_id_file, log_start)

    def _submitted(self, job_id_file: Path, log_start: int, timeout_s: float = 300.0) -> str:
        """Wait for the job script to submit the job and exit; the id of the job on the cluster."""
        client, self.job = self.job, None
        assert client is not None and self.cluster is not None
        try:
            code = client.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
            raise StreamServiceError(f"submitting the job to {self.cluster.address} took over {timeout_s:.0f}s; its log: {self.log}") from None
        if code != 0 or not job_id_file.is_file():
            reason = _last_cause(self.log, log_start)
            raise StreamServiceError(
                f"submitting the job to {self.cluster.address} failed (exit code {code})"
                + (f": {reason}" if reason else "") + f"; its log: {self.log}"
            )
        return job_id_file.read_text().strip()

    def running(self) -> bool:
        if self.cluster is not None:
            return self.job_id is not None and not self.cluster.job(self.job_id).finished
        return self.job is not None and self.job.poll() is None

    def status(self) -> StreamStatus:
        """Committed offsets of the job's consumer group against the topic's end offsets."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers)
        try:
            partitions = [TopicPartition(self.options.topic, p) for p in sorted(consumer.partitions_for_topic(self.options.topic) or [])]
            ends = consumer.end_offsets(partitions)
            try:
                committed = admin.list_group_offsets({self.options.group_id: None}).get(self.options.group_id, {})
            except (CoordinatorNotAvailableError, GroupIdNotFoundError):
                committed = {}  # no checkpoint has completed yet: nothing committed
        finally:
            consumer.close()
            admin.close()
        status = StreamStatus()
        for tp in partitions:
            done = committed.get(tp)
            status.partitions[tp.partition] = PartitionProgress(max(done.offset, 0) if done else 0, ends[tp])
        return status

    def check_running(self) -> None:
        if self.cluster is not None and self.job_id is not None:
            job = self.cluster.job(self.job_id)
            if job.finished:
                reason = self.cluster.failure(self.job_id) if job.state == "FAILED" else None
                raise StreamServiceError(
                    f"the streaming job {job.id} on the cluster at {self.cluster.address} is {job.state}"
                    + (f": {reason}" if reason else "")
                )
            return
        if not self.running():
            code = None if self.job is None else self.job.returncode
            raise StreamServiceError(job_stopped(code, self.log, self.log_start, self.restored_from))

    def wait_until_stable(self, dataset: str, at_least_us: int, timeout_s: float = 300.0) -> int:
        """Wait until the dataset's stable system time reaches `at_least_us`; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_running()
            stable = self.lake.dataset(dataset).stable_system_time()
            if stable is not None and stable >= at_least_us:
                return stable
            if time.monotonic() > deadline:
                raise StreamServiceError(f"{dataset}: stable system time did not reach the published events in {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        try:
            if self.cluster is not None and self.job_id is not None:
                # Cancel, not stop-with-savepoint: the retained checkpoints are what the next start
                # resumes from, and a cancel cannot hang on a savepoint that never completes.
                self.cluster.cancel(self.job_id, timeout_s=max(grace_s, 60.0))
        finally:
            self._stop_processes(grace_s)

    def _stop_processes(self, grace_s: float) -> None:
        job, self.job = self.job, None
        if job is not None and job.poll() is None:
            try:
                os.killpg(job.pid, signal.SIGTERM)
                job.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
            except ProcessLookupError:
                pass
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> StreamService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def job_stopped(code: int | None, log: Path, start: int, restored_from: Path | None) -> str:
    """One line on why the local job stopped, from what it wrote to its log after `start`."""
    cause = _last_cause(log, start)
    if cause is not None and restored_from is not None and "Cannot map checkpoint/savepoint state" in cause:
        return (
            f"the streaming job cannot restore {restored_from}: it holds the state of operators this job does not "
            f"have (a checkpoint of another job, or of an earlier chronolake whose Iceberg sink had no fixed "
            f"operator ids); its log: {log}"
        )
    return f"the streaming job stopped (exit code {code})" + (f": {cause}" if cause else "") + f"; its log: {log}"


def _last_cause(log: Path, start: int) -> str | None:
    """The innermost `Caused by:` of the last Java exception written to a job log after `start`, as one line."""
    try:
        with log.open("rb") as file:
            file.seek(start)
            text = file.read().decode(errors="replace")
    except OSError:
        return None
    causes = [line.removeprefix("Caused by: ").strip() for line in text.splitlines() if line.startswith("Caused by: ")]
    return causes[-1] if causes else None
