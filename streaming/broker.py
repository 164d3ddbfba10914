"""A single-node Kafka broker (KRaft mode) run as a local process, for tests and the demo.

No Docker on the build machines: the broker runs from the jars that `scripts/setup` puts in
`.cache/kafka` (see `pom.xml`, profile `kafka-broker`). The broker is configured the way the
streaming job expects production topics to be: `LogAppendTime`, so the log timestamp is the
broker's clock and never the producer's.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JARS_DIR = REPO_ROOT / ".cache" / "kafka"
LOG_APPEND_TIME = "LogAppendTime"


class BrokerError(Exception):
    """The local Kafka broker could not be started or did not answer."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cluster_id() -> str:
    # KRaft cluster ids are 16 random bytes in URL-safe base64 without padding. One in 64 starts
    # with "-", which the storage tool takes for an option ("--cluster-id: expected one argument");
    # Kafka's own Uuid.randomUuid() skips those too.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass(frozen=True)
class BrokerSettings:
    """How to run the local broker."""

    data_dir: Path
    jars_dir: Path = field(
        default_factory=lambda: Path(os.environ.get("CHRONOLAKE_KAFKA_JARS", DEFAULT_JARS_DIR))
    )
    java: str = field(default_factory=lambda: shutil.which("java") or "java")
    heap: str = "512m"
    default_partitions: int = 1
    startup_timeout_s: float = 90.0


class LocalKafkaBroker:
    """One KRaft node acting as broker and controller on two free loopback ports.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.broker_port = _free_port()
        self.controller_port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def log_file(self) -> Path:
        return self.settings.data_dir / "broker.log"

    def _server_properties(self) -> str:
        s = self.settings
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://127.0.0.1:{self.broker_port},"
                f"CONTROLLER://127.0.0.1:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.broker_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(s.data_dir / "log"),
            "num.partitions": str(s.default_partitions),
            # The design: the broker stamps every record, producer clocks are not trusted.
            "log.message.timestamp.type": LOG_APPEND_TIME,
            # Topics are created on purpose (with their partition count), never by a typo.
            "auto.create.topics.enable": "false",
            # Single node: every internal topic has one replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _java(self, main_class: str, *args: str) -> list[str]:
        s = self.settings
        return [
            s.java,
            "-Xms128m",
            f"-Xmx{s.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            "-cp",
            str(s.jars_dir / "*"),
            main_class,
            *args,
        ]

    def start(self) -> None:
        s = self.settings
        if not any(s.jars_dir.glob("kafka_2.13-*.jar")):
            raise BrokerError(f"no Kafka broker jars in {s.jars_dir}: run scripts/setup")
        s.data_dir.mkdir(parents=True, exist_ok=True)
        config = s.data_dir / "server.properties"
        config.write_text(self._server_properties())
        # Formatted once: a second start() (after stop()) restarts the broker on its data and ports.
        if not (s.data_dir / "log" / "meta.properties").is_file():
            fmt = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)),
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting {s.data_dir / 'log'} failed: {fmt.stderr or fmt.stdout}")
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                self._java("kafka.Kafka", str(config)),
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
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise BrokerError(f"broker exited during start-up, see {self.log_file}")
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
                )
                try:
                    admin.list_topics()
                    return
                finally:
                    admin.close()
            except (KafkaError, OSError) as exc:
                last_error = exc
                time.sleep(0.5)
        raise BrokerError(
            f"broker not ready after {self.settings.startup_timeout_s}s ({last_error}), "
            f"see {self.log_file}"
        )

    def create_topic(self, name: str, partitions: int = 1) -> None:
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            admin.close()

    def topic_timestamp_type(self, name: str) -> str:
        """The effective `message.timestamp.type` of a topic (what the job checks at start-up)."""
        key = "message.timestamp.type"
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers)
        try:
            # kafka-python 3 answers {resource type: {name: {key: {"value": ...}}}}; "all" because
            # "modified" would hide a value inherited from the broker default.
            result = admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name, configs={key: None})],
                config_filter="all",
            )
        finally:
            admin.close()
        entry = result.get("topic", {}).get(name, {}).get(key)
        if entry is None:
            raise BrokerError(f"topic {name} reports no {key}")
        value: str = entry["value"]
        return value

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGTERM lets the broker close its logs cleanly; a hung broker is killed after a grace period.
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> LocalKafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
