"""Exactly once under faults, with the real broker and the real PyFlink job.

1. The job's whole process group (script + gateway JVM) is SIGKILLed three times at random (seeded)
   points of a 100,000-event stream and each time restarted from its newest retained checkpoint.
2. The Kafka broker process is stopped and restarted on the same data and ports mid-stream while
   the job runs (restart attempts > 0); production resumes afterwards.

Each stream spreads many keys over several partitions, with out-of-order valid times, corrections,
deletes, replayed deliveries of the same event id and a few bad records. Afterwards the job has
consumed every offset, the stored rows hold no duplicate, every event was applied at the system time
of its first delivery (recomputed from the log), the versions equal the naive reference model's
(so every as_of answer does), and every bad record is quarantined exactly once.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from chronolake.lake import Lake
from chronolake.streaming.broker import BrokerSettings, LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings
from chronolake.streaming.transactions import UNROUTED_QUARANTINE
from tests.streaming.support import (
    AssertionStream,
    Producer,
    StreamJob,
    cell_time,
    check_stream_result,
    committed_offsets,
    partition_of,
    wait_applied,
)

TIMEOUT_S = 600.0
BAD_RATE = 0.005


def job_settings(home: Path, work: Path, bootstrap_servers: str, topic: str) -> StreamJobSettings:
    return StreamJobSettings(
        home=home,
        datasets=["prices"],
        work_dir=work,
        bootstrap_servers=bootstrap_servers,
        topic=topic,
        stable_interval_ms=500,
        idle_partition_ms=2000,
        # The job recovers by itself from what it can (a broker away, a failed commit) by restarting
        # from its latest checkpoint; the tests' own kills are what it cannot survive alone.
        restart_attempts=10,
    )


def produce(producer: Producer, stream: AssertionStream, rng: random.Random, count: int, partitions: int) -> None:
    """`count` records: good events on their key's partition, now and then a bad one (broken JSON
    or a wrong type); labels in `producer.sent` are the quarantine table of a bad record, else None."""
    for _ in range(count):
        if rng.random() < BAD_RATE:
            key = rng.choice(stream.keys)
            bad = {"dataset": "prices", "k": key, "x": "NaN", "valid_from": cell_time(1), "event_id": f"bad-{rng.random()}"}
            if rng.random() < 0.5:
                producer.send(rng.randrange(partitions), "bad", json.dumps(bad).encode()[:-3], UNROUTED_QUARANTINE)
            else:
                producer.send(partition_of(key, partitions), key, json.dumps(bad).encode(), "prices__quarantine")
            continue
        event = stream.event()
        producer.send(partition_of(event["k"], partitions), event["k"], json.dumps(event).encode())
    producer.flush()


def bad_records(producer: Producer) -> dict[tuple[int, int], str]:
    return {where: table for where, table in producer.sent.items() if table is not None}


@pytest.mark.integration
def test_exactly_once_when_the_job_is_killed_three_times_mid_stream(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path
) -> None:
    events, partitions, keys = 100_000, 3, 1_500
    topic = "faults-kill"
    kafka_broker.create_topic(topic, partitions=partitions)
    servers = kafka_broker.bootstrap_servers
    lake = Lake(tmp_path / "home")
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)
    rng = random.Random(31337)
    stream = AssertionStream(seed=11, keys=keys, null_rate=0.02)
    producer = Producer(servers, topic)
    job = StreamJob(job_settings(tmp_path / "home", tmp_path / "job", servers, topic), tmp_path / "job.log", job_runtime)
    group = job.settings.group_id

    # The stream keeps arriving while the job is killed and restored: produced by a thread in
    # chunks over about 100 s, longer than the kills and restores take, so that the job (which
    # catches up a backlog within seconds) is still mid-stream at the third kill.
    produced = threading.Event()
    failures: list[BaseException] = []

    def feed() -> None:
        try:
            for _ in range(events // 1_000):
                produce(producer, stream, rng, 1_000, partitions)
                time.sleep(1.0)
        except BaseException as error:  # reported by the test thread
            failures.append(error)
        finally:
            produced.set()

    def consumed() -> int:
        return sum(committed_offsets(servers, group, topic).values())

    kills = random.Random(4242)
    killed_at: list[int] = []
    restored_from: list[str] = []
    feeder = threading.Thread(target=feed, name="producer", daemon=True)
    try:
        feeder.start()
        job.start()
        for kill in range(3):
            if kill == 1:
                # Right after a restore: a random moment after the restored job was submitted (its
                # checkpoint folder appears), while it restores its state, its committers commit
                # what the checkpoint had pending, or it takes its first checkpoint.
                job.wait_until(lambda: len(job.submitted()) == 2, "the restored job submitted", TIMEOUT_S, poll_s=0.2)
                time.sleep(kills.uniform(0.0, 6.0))
            else:
                target = int(events * kills.uniform(*((0.10, 0.25) if kill == 0 else (0.55, 0.80))))
                job.wait_until(lambda: consumed() >= target, f"{target} records consumed", TIMEOUT_S, poll_s=0.5)
                # A random phase of the checkpoint cycle (2 s): mid-checkpoint, mid-commit or idle.
                time.sleep(kills.uniform(0.0, 4.0))
            assert job.running(), f"the job stopped before kill {kill + 1}:\n{job.tail()}"
            job.kill()
            killed_at.append(consumed())
            checkpoint = job.latest_checkpoint()
            restored_from.append(checkpoint.name)
            job.start(restore_from=checkpoint)
        assert produced.wait(TIMEOUT_S) and not failures, failures
        records = wait_applied(job, servers, topic, partitions, prices, TIMEOUT_S)
        assert job.running(), "the job stopped"
    finally:
        job.kill()
        produced.wait(TIMEOUT_S)
        producer.close()

    assert len(records) == events
    # The kills happened mid-stream, each restart from a retained checkpoint.
    assert len(killed_at) == 3 and all(n < events for n in killed_at), killed_at
    assert job.starts == 4 and len(restored_from) == 3
    checked = check_stream_result(lake, prices, topic, records, bad_records(producer), stream.keys, rng)
    assert checked.quarantined > 0 and checked.good + checked.quarantined == events


@pytest.mark.integration
def test_exactly_once_across_a_broker_restart_mid_stream(job_runtime: JobRuntime, tmp_path: Path) -> None:
    events, partitions, keys = 12_000, 2, 300
    topic = "faults-broker"
    rng = random.Random(8080)
    stream = AssertionStream(seed=12, keys=keys)
    lake = Lake(tmp_path / "home")
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)
    broker = LocalKafkaBroker(BrokerSettings(data_dir=tmp_path / "kafka"))
    broker.start()
    job: StreamJob | None = None
    try:
        servers = broker.bootstrap_servers
        broker.create_topic(topic, partitions=partitions)
        job = StreamJob(job_settings(tmp_path / "home", tmp_path / "job", servers, topic), tmp_path / "job.log", job_runtime)
        sent: dict[tuple[int, int], str | None] = {}
        producer = Producer(servers, topic)
        produce(producer, stream, rng, events // 2, partitions)
        producer.close()
        sent.update(producer.sent)
        job.start()
        target = events // 4
        job.wait_until(
            lambda: sum(committed_offsets(servers, job.settings.group_id, topic).values()) >= target,
            f"{target} records consumed",
            TIMEOUT_S,
        )
        # The broker goes away (its process ends) while the job is consuming, stays away a while,
        # and comes back on the same log directory and ports.
        broker.stop()
        time.sleep(rng.uniform(5.0, 10.0))
        assert job.running(), f"the job stopped while the broker was away:\n{job.tail()}"
        broker.start()
        producer = Producer(servers, topic)
        produce(producer, stream, rng, events - events // 2, partitions)
        producer.close()
        sent.update(producer.sent)
        records = wait_applied(job, servers, topic, partitions, prices, TIMEOUT_S)
        assert job.running(), "the job stopped"
        assert job.starts == 1
    finally:
        if job is not None:
            job.kill()
        broker.stop()

    assert len(records) == events
    bad = {where: table for where, table in sent.items() if table is not None}
    checked = check_stream_result(lake, prices, topic, records, bad, stream.keys, rng)
    assert checked.good + checked.quarantined == events
