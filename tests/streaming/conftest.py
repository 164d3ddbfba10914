"""Session-scoped real services for the streaming tests: one local KRaft broker per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from chronolake.streaming.broker import BrokerSettings, LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime
from tests.streaming.flink_cluster import LocalFlinkCluster, local_flink_cluster


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaBroker]:
    """A started broker (readiness checked by `start()`); each test creates its own topics."""
    with LocalKafkaBroker(BrokerSettings(data_dir=tmp_path_factory.mktemp("kafka"))) as broker:
        yield broker


@pytest.fixture(scope="session")
def job_runtime() -> JobRuntime:
    """The job venv and Flink jars made by scripts/setup (fails clearly when they are missing)."""
    runtime = JobRuntime()
    runtime.site_packages()
    runtime.jars()
    return runtime


@pytest.fixture(scope="module")
def flink_cluster(job_runtime: JobRuntime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFlinkCluster]:
    """A standalone Flink session cluster (JobManager + one TaskManager, 4 slots) as local processes,
    ready when its REST API reports the slots; stopped after the module's tests."""
    with local_flink_cluster(job_runtime, tmp_path_factory.mktemp("flink")) as cluster:
        yield cluster
