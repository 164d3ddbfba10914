"""How the tools env launches a PyFlink job: which interpreter, which jars, which environment.

The job runs in its own virtualenv (`.venv/job`, PyFlink 1.20 pins pyarrow < 12) and starts a local
Flink mini-cluster inside the PyFlink gateway JVM. Two things must be handed to it from outside:

- the JVM jars (`.cache/jars`: Kafka connector, Iceberg Flink runtime, Hadoop client, JDBC
  drivers). They go on the gateway JVM's own classpath through `HADOOP_CLASSPATH`, the one hook
  `pyflink_gateway_server.py` adds to the classpath. Parent classpath rather than `pipeline.jars`
  because `java.sql.DriverManager` only sees JDBC drivers loaded by the system class loader, and
  Flink always loads `org.apache.hadoop.*` parent-first anyway.
- `PYTHONPATH` with the job venv's site-packages: in thread mode (`python.execution-mode: thread`)
  the Python functions run in an interpreter embedded in the JVM (PEMJA). That interpreter starts
  from the base Python installation, not from the venv, so it finds PyFlink and its dependencies
  only through `PYTHONPATH`. The same holds for chronolake's pure modules the bitemporal job
  imports (`chronolake.iceberg` algebra/parsing, `chronolake.streaming.transactions`): a folder of
  symlinks that spells the package layout (`chronolake/iceberg` -> `iceberg/`) goes on `PYTHONPATH`
  too. An editable install would not do: its `.pth` hook runs only for site directories, and
  `PYTHONPATH` entries are not site directories.

`launch_stream_job` prepares and starts the bitemporal job (`streaming/job.py`) for datasets of a lake.
With `jobmanager` set, the job script is only the client: it submits the job to that Flink session
cluster (whose `lib/` holds the same jars), ships the chronolake modules as a zip (`job_archive`,
`python.files`), writes the job's id to `job_id_file` and exits.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from pyiceberg.exceptions import TableAlreadyExistsError
from pyiceberg.expressions import In

from chronolake.iceberg.algebra import Key, KeyState
from chronolake.iceberg.config import LakeSettings
from chronolake.iceberg.dataset import CLOSED, EVENT, OPEN, ROW_KIND
from chronolake.iceberg.rows import python_columns
from chronolake.iceberg.schema import quarantine_schema
from chronolake.iceberg.table import BitemporalTable
from chronolake.lake import Lake
from chronolake.streaming.catalog import UnsupportedCatalog, catalog_properties
from chronolake.streaming.kinesis import DEFAULT_REGION, kinesis_client
from chronolake.streaming.sources import KAFKA, KINESIS, SOURCES, shard_number
from chronolake.streaming.transactions import UNROUTED_QUARANTINE

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_SCRIPT = REPO_ROOT / "streaming" / "job.py"
LOG_APPEND_TIME = "LogAppendTime"
#: The packages the job imports from the repository, as `chronolake.<name>` -> folder.
_JOB_PACKAGES = {"iceberg": REPO_ROOT / "iceberg", "streaming": REPO_ROOT / "streaming"}


class JobRuntimeError(Exception):
    """The job virtualenv or the Flink jars are missing."""


class StreamSourceError(Exception):
    """The source topic or stream cannot feed the bitemporal job (missing, not `LogAppendTime`, ...)."""


def _default_venv() -> Path:
    return Path(os.environ.get("CHRONOLAKE_JOB_VENV", REPO_ROOT / ".venv" / "job"))


def _default_jars() -> Path:
    return Path(os.environ.get("CHRONOLAKE_FLINK_JARS", REPO_ROOT / ".cache" / "jars"))


def _default_packages() -> Path:
    return REPO_ROOT / ".cache" / "job-python"


def job_packages(root: Path) -> Path:
    """`root/chronolake/{__init__.py, iceberg, streaming}` as symlinks into the repository (idempotent)."""
    package = root / "chronolake"
    package.mkdir(parents=True, exist_ok=True)
    links = {"__init__.py": REPO_ROOT / "chronolake" / "__init__.py", **_JOB_PACKAGES}
    for name, target in links.items():
        link = package / name
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return root


@dataclass(frozen=True)
class JobRuntime:
    """The job virtualenv plus the Flink classpath, as made by `scripts/setup`."""

    venv: Path = field(default_factory=_default_venv)
    jars_dir: Path = field(default_factory=_default_jars)
    packages_dir: Path = field(default_factory=_default_packages)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def site_packages(self) -> Path:
        found = sorted(self.venv.glob("lib/python3.*/site-packages"))
        if not found or not (found[0] / "pyflink").is_dir():
            raise JobRuntimeError(f"PyFlink is not installed in {self.venv}: run scripts/setup")
        return found[0]

    def jars(self) -> list[Path]:
        jars = sorted(self.jars_dir.glob("*.jar"))
        if not any(j.name.startswith("iceberg-flink-runtime") for j in jars):
            raise JobRuntimeError(f"no Flink jars in {self.jars_dir}: run scripts/setup")
        return jars

    def environment(self, log_dir: Path | None = None) -> dict[str, str]:
        """The process environment for `python <job script>` in the job venv."""
        env = dict(os.environ)
        # Replaced, not extended: anything from the tools env (pyarrow >= 18) would break PyFlink.
        env["PYTHONPATH"] = os.pathsep.join([str(self.site_packages()), str(job_packages(self.packages_dir))])
        env["HADOOP_CLASSPATH"] = os.pathsep.join(str(j) for j in self.jars())
        # Without this the gateway logs into the installed pyflink package (site-packages/pyflink/log).
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            env["FLINK_LOG_DIR"] = str(log_dir)
        env.pop("VIRTUAL_ENV", None)
        env.pop("PYTHONHOME", None)
        return env

    def command(self, script: Path, *args: str) -> list[str]:
        return [str(self.python), str(script), *args]


@dataclass(frozen=True, kw_only=True)
class StreamJobSettings:
    """Where the bitemporal job reads, writes and checkpoints. `source` picks the log: Kafka
    (`bootstrap_servers`, `topic`, `group_id`) or Kinesis (`stream`, `region`, `endpoint`)."""

    home: Path
    datasets: Sequence[str]
    work_dir: Path
    source: str = KAFKA
    bootstrap_servers: str = ""
    topic: str = ""
    group_id: str = "chronolake-stream"
    stream: str = ""
    region: str = DEFAULT_REGION
    #: None = the region's AWS endpoint; `http://127.0.0.1:<port>` = an emulator (dummy credentials).
    endpoint: str | None = None
    checkpoint_interval_ms: int = 2000
    stable_interval_ms: int = 1000
    idle_partition_ms: int = 10_000
    max_event_bytes: int = 1 << 20
    restart_attempts: int = 0
    restore_from: Path | None = None
    #: A key's state expires after this long without a record (0: never); its next record reads the
    #: table (`chronolake.streaming.lookup`). Local mini-cluster only.
    state_ttl_ms: int = 0
    #: `HOST:PORT` of a Flink session cluster's REST endpoint; None = a local mini-cluster.
    jobmanager: str | None = None
    #: The job's name on the cluster (how a second start finds a job still running there).
    job_name: str = "chronolake-stream"
    #: The job venv's Python on the cluster's workers; None = the same path as here.
    cluster_python: str | None = None

    @property
    def job_id_file(self) -> Path:
        """Where the job script writes the id of the job it submitted to the cluster."""
        return self.work_dir / "job-id"


def topic_source(bootstrap_servers: str, topic: str) -> int:
    """The topic's partition count, after checking it stamps records with the broker's clock."""
    key = "message.timestamp.type"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        described = admin.describe_topics([topic])
        # kafka-python 3 answers {resource type: {name: {key: {"value": ...}}}}; "all" because
        # "modified" would hide a value inherited from the broker default.
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, configs={key: None})], config_filter="all"
        )
    finally:
        admin.close()
    partitions = [p for t in described if t.get("name") == topic and not t.get("error_code") for p in t.get("partitions", [])]
    if not partitions:
        raise StreamSourceError(f"topic {topic!r} does not exist or has no partitions")
    timestamp_type = configs.get("topic", {}).get(topic, {}).get(key, {}).get("value")
    if timestamp_type != LOG_APPEND_TIME:
        raise StreamSourceError(
            f"topic {topic!r} has message.timestamp.type={timestamp_type}; the job needs LogAppendTime "
            "(system time comes from the broker's clock, never the producer's)"
        )
    return len(partitions)


def kinesis_source(stream: str, region: str, endpoint: str | None = None) -> list[str]:
    """The stream's shard ids (open and closed ones still holding records), sorted by shard number,
    after checking the stream exists and is readable. No clock setting to check: every record's
    approximate arrival time is stamped by the service."""
    client = kinesis_client(region, endpoint)
    try:
        summary = client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
        if summary["StreamStatus"] not in {"ACTIVE", "UPDATING"}:
            raise StreamSourceError(f"stream {stream!r} is {summary['StreamStatus']}, not ACTIVE")
        shards: list[str] = []
        page = client.list_shards(StreamName=stream)
        while True:
            shards += [shard["ShardId"] for shard in page["Shards"]]
            if not page.get("NextToken"):
                break
            page = client.list_shards(NextToken=page["NextToken"])
    except client.exceptions.ResourceNotFoundException:
        raise StreamSourceError(f"stream {stream!r} does not exist in {region}") from None
    if not shards:
        raise StreamSourceError(f"stream {stream!r} has no shards")
    try:
        return sorted(shards, key=shard_number)
    except ValueError as error:
        raise StreamSourceError(str(error)) from None


def job_archive(path: Path) -> Path:
    """A zip of the `chronolake` modules the job imports, laid out as the package
    (`chronolake/__init__.py`, `chronolake/iceberg/...`, `chronolake/streaming/...`). Shipped with the
    job (`python.files`), it is on the TaskManagers' Python path: a cluster needs no chronolake install."""
    partial = path.with_suffix(".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(REPO_ROOT / "chronolake" / "__init__.py", "chronolake/__init__.py")
        for name, folder in _JOB_PACKAGES.items():
            for file in sorted(folder.rglob("*")):
                if file.is_file() and "__pycache__" not in file.parts:
                    archive.write(file, f"chronolake/{name}/{file.relative_to(folder).as_posix()}")
    partial.replace(path)
    return path


def _source_arguments(settings: StreamJobSettings) -> tuple[dict[str, object], list[str]]:
    """Checks the source; returns what the plan records about it and the job's source arguments."""
    if settings.source == KINESIS:
        if not settings.stream:
            raise StreamSourceError("a Kinesis source needs a stream name")
        shards = kinesis_source(settings.stream, settings.region, settings.endpoint)
        args = ["--source", KINESIS, "--stream", settings.stream, "--region", settings.region]
        if settings.endpoint:
            args += ["--endpoint", settings.endpoint]
        return {"partitions": len(shards), "shards": shards}, args
    if settings.source != KAFKA:
        raise StreamSourceError(f"unknown source {settings.source!r} (one of {', '.join(SOURCES)})")
    if not settings.bootstrap_servers or not settings.topic:
        raise StreamSourceError("a Kafka source needs bootstrap servers and a topic")
    partitions = topic_source(settings.bootstrap_servers, settings.topic)
    args = [
        "--source", KAFKA,
        "--bootstrap-servers", settings.bootstrap_servers,
        "--topic", settings.topic,
        "--group-id", settings.group_id,
    ]
    return {"partitions": partitions}, args


def table_states(table: BitemporalTable) -> dict[Key, KeyState]:
    """Every key's current state, rebuilt from the table (the bootstrap of the job's keyed state)."""
    if table.table.current_snapshot() is None:
        return {}
    # Keys with any version or event marker: a deleted key has no open row but its event ids count.
    rows = table.scan(In(ROW_KIND, {OPEN, CLOSED, EVENT}), table.spec.key_names)
    keys = sorted(set(zip(*python_columns(rows, table.spec.key_names))), key=repr)
    states: dict[Key, KeyState] = table.load_state(keys)
    return states


def job_catalog(settings: LakeSettings) -> dict[str, str]:
    """The lake's catalog as the job opens it (`chronolake.streaming.catalog`), or a one-line
    `JobRuntimeError` saying why it cannot."""
    try:
        return catalog_properties(settings.catalog_properties)
    except UnsupportedCatalog as error:
        raise JobRuntimeError(str(error)) from None


def prepare_stream_job(settings: StreamJobSettings, runtime: JobRuntime | None = None) -> list[str]:
    """Check the source, create the unrouted quarantine, write the job's plan and state bootstrap;
    returns the command that starts the job.

    The bootstrap is every key's state as the table has it now. It is read once, at launch: keys
    the Flink state does not know start from it. That is right while the job is the datasets' only
    writer (DESIGN: one writer per dataset); a batch load committed while the job runs is not seen.
    """
    runtime = runtime or JobRuntime()
    lake = Lake(settings.home)
    lake_settings: LakeSettings = lake.settings
    catalog = job_catalog(lake_settings)
    source_plan, source_args = _source_arguments(settings)
    tables = [lake.dataset(name).table for name in settings.datasets]
    try:
        lake.catalog.create_table((lake_settings.namespace, UNROUTED_QUARANTINE), schema=quarantine_schema())
    except TableAlreadyExistsError:
        pass
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    plan_path = settings.work_dir / "plan.json"
    bootstrap_path = settings.work_dir / "bootstrap.pickle"
    plan = {
        "home": str(lake_settings.home),
        "catalog": catalog,
        "namespace": lake_settings.namespace,
        "datasets": {t.spec.name: t.spec.to_json() for t in tables},
        **source_plan,
    }
    # The catalog's properties may hold credentials: readable by this user only.
    plan_path.touch(mode=0o600)
    plan_path.chmod(0o600)
    plan_path.write_text(json.dumps(plan, indent=2))
    # Pickle: payloads hold Decimals and dates, and both ends run the same chronolake.iceberg code.
    bootstrap = {t.spec.name: table_states(t) for t in tables}
    bootstrap_path.write_bytes(pickle.dumps(bootstrap, protocol=pickle.HIGHEST_PROTOCOL))
    args = [
        "--plan", str(plan_path),
        "--bootstrap", str(bootstrap_path),
        *source_args,
        "--checkpoint-dir", str(settings.work_dir / "checkpoints"),
        "--checkpoint-interval-ms", str(settings.checkpoint_interval_ms),
        "--stable-interval-ms", str(settings.stable_interval_ms),
        "--idle-partition-ms", str(settings.idle_partition_ms),
        "--max-event-bytes", str(settings.max_event_bytes),
        "--restart-attempts", str(settings.restart_attempts),
        "--state-ttl-ms", str(settings.state_ttl_ms),
    ]
    if settings.restore_from is not None:
        args += ["--restore-from", str(settings.restore_from)]
    if settings.jobmanager:
        settings.job_id_file.unlink(missing_ok=True)
        args += [
            "--jobmanager", settings.jobmanager,
            "--job-name", settings.job_name,
            "--python-files", str(job_archive(settings.work_dir / "chronolake-job.zip")),
            "--job-id-file", str(settings.job_id_file),
        ]
        if settings.cluster_python:
            args += ["--cluster-python", settings.cluster_python]
    return runtime.command(JOB_SCRIPT, *args)


def launch_stream_job(
    settings: StreamJobSettings, log: Path, runtime: JobRuntime | None = None
) -> subprocess.Popen[bytes]:
    """Start the bitemporal job in its own process group (stop it with `os.killpg(job.pid, ...)`:
    the job script and its gateway JVM go together). Output goes to `log`, Flink's log beside it."""
    runtime = runtime or JobRuntime()
    command = prepare_stream_job(settings, runtime)
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            env=runtime.environment(log_dir=settings.work_dir / "flink-log"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
