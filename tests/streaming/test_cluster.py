"""`chronolake stream --jobmanager`: the job on a real Flink 1.20 session cluster (local processes,
`flink_cluster` fixture), fed through the session's Kafka broker, followed and cancelled over REST,
resumed from its retained checkpoint; user mistakes as one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest

from chronolake.lake import Lake
from chronolake.streaming.broker import LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime
from tests.conftest import CHRONOLAKE, free_port
from tests.streaming.flink_cluster import LocalFlinkCluster

pytestmark = pytest.mark.integration

Run = Callable[..., Any]
TIMEOUT_S = 300.0  # readiness waits only


def _wait_for(path: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + TIMEOUT_S
    while (found := re.search(pattern, path.read_text())) is None:
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.5)
    return found


def _wait_for_state(cluster: LocalFlinkCluster, job_id: str, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while cluster.jobs().get(job_id) != state:
        assert time.monotonic() < deadline, (cluster.jobs(), cluster.logs())
        time.sleep(0.5)


def _wait_for_taskmanager_log(cluster: LocalFlinkCluster, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in cluster.taskmanager_log():
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.5)


def _start_stream(lake_home: Path, output: Path, *args: str) -> subprocess.Popen[bytes]:
    with output.open("wb") as out:
        return subprocess.Popen(
            [CHRONOLAKE, "stream", "prices", "--idle-partition-ms", "1000", "--every", "2", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CHRONOLAKE_HOME": str(lake_home)},
            start_new_session=True,
        )


def _interrupt(stream: subprocess.Popen[bytes], output: Path) -> str:
    os.killpg(stream.pid, signal.SIGINT)
    stream.wait(timeout=TIMEOUT_S)
    log = output.read_text()
    assert stream.returncode == 0, log
    assert "stopped" in log and "Traceback" not in log
    return log


def _publish(cli: Run, source: Path) -> str:
    published = cli("load", "prices", str(source), "--via-stream", "--json")
    assert published.returncode == 0, published.stderr
    [file] = json.loads(published.stdout)["files"]
    assert file["status"] == "published" and file["committed_at"] is not None, file
    return str(file["committed_at"])


def _prices(cli: Run, known_at: str) -> dict[str, Decimal]:
    queried = cli("query", "prices", "--valid-at", "2024-03-01", "--known-at", known_at, "--format", "json")
    assert queried.returncode == 0, queried.stderr
    return {r["id"]: r["price"] for r in (json.loads(line, parse_float=Decimal) for line in queried.stdout.splitlines())}


def test_stream_runs_on_a_session_cluster_cancels_on_ctrl_c_and_resumes_from_its_checkpoint(
    cli: Run,
    lake_home: Path,
    tmp_path: Path,
    kafka_broker: LocalKafkaBroker,
    flink_cluster: LocalFlinkCluster,
    job_runtime: JobRuntime,
) -> None:
    assert cli("dataset", "create", "prices", "--key", "id", "--column", "price:decimal(18,4)").returncode == 0
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("id,price,valid_from,valid_to\na,1.5,2024-01-01,\nb,2.5,2024-01-01,\na,1.7,2024-02-01,\nc,oops,2024-01-01,\n")
    second.write_text("id,price,valid_from,valid_to\na,1.9,2024-02-15,\nd,4,2024-01-01,\n")
    cluster_args = ("--bootstrap-servers", kafka_broker.bootstrap_servers, "--topic", "cluster-prices",
                    "--jobmanager", flink_cluster.rest_address)

    output = tmp_path / "stream-1.out"
    stream = _start_stream(lake_home, output, *cluster_args)
    try:
        job_id = _wait_for(output, r"job (\w{32}) runs on the Flink cluster", stream).group(1)
        assert "no checkpoint" in output.read_text()
        _wait_for_state(flink_cluster, job_id, "RUNNING")  # the cluster runs it, not a local process
        committed_first = _publish(cli, first)
        assert _prices(cli, committed_first) == {"a": Decimal("1.7"), "b": Decimal("2.5")}
        quarantined = cli("quarantine", "prices", "--format", "json")
        assert [r["line"] for r in map(json.loads, quarantined.stdout.splitlines())] == [5]
        # Progress lines from the offsets the job commits to Kafka with its checkpoints, as locally.
        _wait_for(output, r"consumed [1-9]\d* events", stream)
    finally:
        _interrupt(stream, output)
    jobs = flink_cluster.jobs()
    assert jobs[job_id] == "CANCELED"
    assert all(state in {"CANCELED", "FINISHED", "FAILED"} for state in jobs.values()), jobs

    # The workers' job venv at another path than the client's (here a symlink to the same venv).
    workers_venv = tmp_path / "workers-venv"
    workers_venv.symlink_to(job_runtime.venv.resolve(), target_is_directory=True)
    output = tmp_path / "stream-2.out"
    stream = _start_stream(lake_home, output, *cluster_args, "--cluster-python", str(workers_venv / "bin" / "python"))
    try:
        resumed_id = _wait_for(output, r"job (\w{32}) runs on the Flink cluster", stream).group(1)
        assert resumed_id != job_id
        assert re.search(rf"resuming from checkpoint .*/{job_id}/chk-\d+", output.read_text())
        _wait_for_state(flink_cluster, resumed_id, "RUNNING")
        # The TaskManager runs the functions with that interpreter and its site-packages.
        _wait_for_taskmanager_log(flink_cluster, f"Python interpreter path: {workers_venv}/bin/python")
        _wait_for_taskmanager_log(flink_cluster, f"PYTHONPATH of python worker: {workers_venv}/lib/python3.11/site-packages:")
        second_writer = cli("stream", "prices", *cluster_args)  # one writer per dataset
        assert second_writer.returncode == 1 and "Traceback" not in second_writer.stderr
        assert f"already runs on the cluster at {flink_cluster.rest_address} as job {resumed_id}" in second_writer.stderr
        assert flink_cluster.jobs()[resumed_id] == "RUNNING"
        again = cli("load", "prices", str(first), "--via-stream", "--json")
        assert json.loads(again.stdout)["files"][0]["status"] == "already loaded"
        committed_second = _publish(cli, second)
        assert _prices(cli, committed_second) == {"a": Decimal("1.9"), "b": Decimal("2.5"), "d": Decimal("4")}
        # What was reported before is reproduced exactly; nothing was applied twice.
        assert _prices(cli, committed_first) == {"a": Decimal("1.7"), "b": Decimal("2.5")}
        history = cli("history", "prices", "a", "--format", "json")
        versions = [json.loads(line) for line in history.stdout.splitlines()]
        identities = [(v["valid_from"], v["system_from"]) for v in versions]
        assert len(identities) == len(set(identities)), versions
        quarantined = cli("quarantine", "prices", "--format", "json")
        assert [r["line"] for r in map(json.loads, quarantined.stdout.splitlines())] == [5]
    finally:
        _interrupt(stream, output)
    assert flink_cluster.jobs()[resumed_id] == "CANCELED"
    assert flink_cluster.api.request("/overview")["jobs-running"] == 0


@pytest.mark.parametrize(
    "jobmanager, message",
    [
        ("127.0.0.1:{free}", "no Flink REST API at 127.0.0.1:"),
        ("{kafka}", "not Flink's REST API|no Flink REST API at"),
        ("localhost", "is not HOST:PORT"),
    ],
    ids=["nothing-listening", "not-a-jobmanager", "no-port"],
)
def test_a_wrong_jobmanager_is_one_line(
    cli: Run, lake: Lake, kafka_broker: LocalKafkaBroker, jobmanager: str, message: str
) -> None:
    assert cli("dataset", "create", "prices", "--key", "id", "--column", "price:decimal(18,4)").returncode == 0
    address = jobmanager.format(free=free_port(), kafka=kafka_broker.bootstrap_servers)
    started = cli("stream", "prices", "--bootstrap-servers", kafka_broker.bootstrap_servers, "--jobmanager", address)
    assert started.returncode == 1, started.stdout
    assert started.stderr.count("\n") == 1 and "Traceback" not in started.stderr, started.stderr
    assert re.search(message, started.stderr), started.stderr
    assert lake.dataset("prices").stream_owner() is None, "refused before claiming the dataset"
