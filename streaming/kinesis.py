"""Kinesis data streams from the tools env: a boto3 client, a publisher, and a local emulator.

- `publish_kinesis` puts assertion events with `PutRecords`, in batches, keeping each partition
  key's records in the order given (what the job's per-key transactions need; see its docstring).
- `LocalKinesis` runs the Kinesis emulator `kinesis-local` (npm, a Node.js build of kinesis-mock)
  as a local process for tests and the demo, the way `LocalKafkaBroker` runs Kafka: no Docker on the
  build machines. `scripts/setup` installs it into `.cache/emulators` from the pinned
  `streaming/emulators/package-lock.json`.

System time for a Kinesis source is each record's `ApproximateArrivalTimestamp`: stamped by the
service (here the emulator) on arrival, never by the producer, and stored with the record, so a
replay reads the same value. There is no setting to check, unlike Kafka's `LogAppendTime`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from chronolake.streaming.sources import emulator_credentials

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_EMULATOR_DIR = REPO_ROOT / ".cache" / "emulators" / "node_modules" / "kinesis-local"
DEFAULT_REGION = "us-east-1"
#: PutRecords limits: 500 records and 5 MiB per request, 1 MiB per record (data + partition key).
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 << 20
MAX_RECORD_BYTES = 1 << 20
MAX_PARTITION_KEY_CHARS = 256


class KinesisError(Exception):
    """A Kinesis call failed for good (after retries), or the emulator could not be started."""


def kinesis_client(region: str = DEFAULT_REGION, endpoint: str | None = None) -> Any:
    """A boto3 Kinesis client. An emulator on loopback gets dummy credentials (it accepts any);
    anything else uses boto3's default credential chain."""
    credentials = emulator_credentials(endpoint)
    keys = {} if credentials is None else {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30)
    return boto3.client("kinesis", region_name=region, endpoint_url=endpoint, config=config, **keys)


def partition_key(text: str) -> str:
    """The partition key Kinesis accepts (1 to 256 characters): the text, or the hex SHA-256 of a
    longer one. Either way a given text always maps to the same key, hence the same shard."""
    if not text:
        raise ValueError("a Kinesis partition key cannot be empty")
    return text if len(text) <= MAX_PARTITION_KEY_CHARS else hashlib.sha256(text.encode()).hexdigest()


def _batches(records: Iterable[tuple[str, bytes]], max_records: int) -> Iterator[list[tuple[str, bytes]]]:
    """Consecutive runs of records with distinct partition keys, within the PutRecords limits."""
    batch: list[tuple[str, bytes]] = []
    keys: set[str] = set()
    size = 0
    for text, data in records:
        key = partition_key(text)
        record_size = len(key.encode()) + len(data)
        if record_size > MAX_RECORD_BYTES:
            raise ValueError(f"a record of {record_size} bytes exceeds Kinesis' {MAX_RECORD_BYTES} (key {key!r})")
        if batch and (key in keys or len(batch) == max_records or size + record_size > MAX_BATCH_BYTES):
            yield batch
            batch, keys, size = [], set(), 0
        batch.append((key, data))
        keys.add(key)
        size += record_size
    if batch:
        yield batch


def publish_kinesis(
    endpoint: str | None,
    stream: str,
    records: Iterable[tuple[str, bytes]],
    *,
    region: str = DEFAULT_REGION,
    max_batch: int = MAX_BATCH_RECORDS,
    max_attempts: int = 10,
    client: Any = None,
) -> int:
    """Writes `(partition key, data)` records to a stream with `PutRecords`; returns how many.

    Key records by entity (dataset and key), as for Kafka: one key's records then share a shard,
    and the job applies them in shard order. Keys over 256 characters go by their SHA-256
    (`partition_key`). `PutRecords` can fail some records of a request
    (throttling) and accept the rest, so a key's records could overtake each other on retry; a
    request therefore never carries two records with the same partition key, and its failed records
    are retried (with backoff) before the next request goes. Order across keys is not kept; the
    job does not need it. Delivery is at least once: a request that timed out may have been
    written before boto3 retried it; event ids make such a redelivery change nothing in the job.
    Raises `KinesisError` when records still fail after `max_attempts`.
    """
    client = client or kinesis_client(region, endpoint)
    written = 0
    for batch in _batches(records, max_batch):
        pending = [{"PartitionKey": key, "Data": data} for key, data in batch]
        for attempt in range(max_attempts):
            try:
                response = client.put_records(StreamName=stream, Records=pending)
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code not in {"ProvisionedThroughputExceededException", "LimitExceededException"}:
                    raise KinesisError(f"PutRecords to {stream}: {error}") from error
                failed = pending
            else:
                failed = [r for r, result in zip(pending, response["Records"]) if "ErrorCode" in result]
                written += len(pending) - len(failed)
            if not failed:
                break
            pending = failed
            time.sleep(min(0.05 * 2**attempt, 2.0))
        else:
            raise KinesisError(f"{len(pending)} records to {stream} still failing after {max_attempts} attempts")
    return written


def create_stream(client: Any, stream: str, shards: int, timeout_s: float = 60.0) -> None:
    """Creates a provisioned stream and waits until it is ACTIVE."""
    client.create_stream(StreamName=stream, ShardCount=shards)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        summary = client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
        if summary["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.2)
    raise KinesisError(f"stream {stream} not ACTIVE after {timeout_s}s")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class KinesisEmulatorSettings:
    """How to run the local Kinesis emulator."""

    data_dir: Path
    package_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("CHRONOLAKE_KINESIS_EMULATOR", DEFAULT_EMULATOR_DIR))
    )
    node: str = field(default_factory=lambda: shutil.which("node") or "node")
    region: str = DEFAULT_REGION
    startup_timeout_s: float = 60.0


class LocalKinesis:
    """`kinesis-local` on two free ports (plain HTTP, which clients use, and TLS, which it always opens).

    It keeps streams in memory only. Use as a context manager, or call `start()` and `stop()`.
    It binds every interface (it has no host setting), not only loopback.
    """

    def __init__(self, settings: KinesisEmulatorSettings) -> None:
        self.settings = settings
        self.port = _free_port()
        self.tls_port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return self.settings.region

    @property
    def log_file(self) -> Path:
        return self.settings.data_dir / "kinesis.log"

    def client(self) -> Any:
        return kinesis_client(self.region, self.endpoint)

    def start(self) -> None:
        s = self.settings
        main = s.package_dir / "main.js"
        if not main.is_file():
            raise KinesisError(f"no Kinesis emulator at {s.package_dir}: run scripts/setup (needs npm)")
        s.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "KINESIS_MOCK_PLAIN_PORT": str(self.port),
            "KINESIS_MOCK_TLS_PORT": str(self.tls_port),
            # Its self-signed certificate; the default path is relative to the working directory.
            "KINESIS_MOCK_CERT_PATH": str(s.package_dir / "server.json"),
            "AWS_REGION": s.region,
            "SHOULD_PERSIST_DATA": "false",
            "LOG_LEVEL": "WARN",
        }
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [s.node, str(main)],
                cwd=s.data_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        client = self.client()
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise KinesisError(f"Kinesis emulator exited during start-up, see {self.log_file}")
            try:
                client.list_streams(Limit=1)
                return
            except (BotoCoreError, ClientError) as exc:
                last_error = exc
                time.sleep(0.2)
        raise KinesisError(
            f"Kinesis emulator not ready after {self.settings.startup_timeout_s}s ({last_error}), see {self.log_file}"
        )

    def create_stream(self, stream: str, shards: int) -> None:
        create_stream(self.client(), stream, shards)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalKinesis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
