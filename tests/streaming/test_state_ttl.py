"""State TTL: a key whose state expired is read back from the table (the truth), not started afresh.

A real broker and the real job with `--state-ttl-ms`. Key `k` gets a version, its state expires, and
a later correction of `k` must close the version the table holds: started afresh, the job would
leave two current versions for the same valid time. A redelivery of the first event after the
expiry is still ignored (the event ids come back from the table too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from chronolake.lake import Lake
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings, prepare_stream_job

TTL_MS = 3000
TIMEOUT_S = 300.0  # readiness waits only


def _event(x: int, valid_from: str, event_id: str) -> bytes:
    return json.dumps({"dataset": "prices", "k": "k", "x": x, "valid_from": valid_from, "event_id": event_id}).encode()


def _wait(condition: Any, what: str, job: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert job.poll() is None, f"job exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_an_expired_key_is_read_back_from_the_table(kafka_broker: Any, job_runtime: JobRuntime, tmp_path: Path) -> None:
    topic = "state-ttl"
    kafka_broker.create_topic(topic, partitions=1)
    home = tmp_path / "lake"
    lake = Lake(home)
    prices = lake.create_dataset("prices", key=["k"], columns=["x:long"])
    settings = StreamJobSettings(
        home=home, datasets=["prices"], work_dir=tmp_path / "job", bootstrap_servers=kafka_broker.bootstrap_servers,
        topic=topic, checkpoint_interval_ms=500, idle_partition_ms=500, restart_attempts=20, state_ttl_ms=TTL_MS,
    )
    command = prepare_stream_job(settings, job_runtime)
    log = tmp_path / "job.log"
    with log.open("ab") as out:
        job = subprocess.Popen(
            command, env=job_runtime.environment(log_dir=settings.work_dir / "flink-log"), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)

    def versions_at(valid_at: str) -> list[int]:
        stable = prices.stable_system_time()
        return [] if stable is None else [r["x"] for r in prices.as_of(valid_at, stable).to_pylist()]

    try:
        producer.send(topic, _event(1, "2024-01-01", "e1")).get(timeout=30)
        _wait(lambda: versions_at("2024-03-01") == [1], "the first version", job, log)
        time.sleep(2 * TTL_MS / 1000)  # k's state expires (no record for it meanwhile)

        producer.send(topic, _event(2, "2024-02-01", "e2")).get(timeout=30)
        last = producer.send(topic, _event(1, "2024-01-01", "e1")).get(timeout=30)  # a redelivery, after the expiry
        _wait(lambda: (prices.stable_system_time() or 0) >= last.timestamp * 1000, "the correction", job, log)
    finally:
        producer.close()
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()

    assert versions_at("2024-01-15") == [1]
    assert versions_at("2024-03-01") == [2], "one current version: the expired key's state came from the table"
    current = prices.timeline().to_pylist()
    assert sorted((r["x"], str(r["valid_from"])[:10]) for r in current) == [(1, "2024-01-01"), (2, "2024-02-01")]
    assert "lookup: " in log.read_text(), "the job asked the table for the expired key"
