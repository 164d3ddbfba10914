"""The bitemporal job on other storage than the embedded default: the lake's catalog in PostgreSQL (a
real server) and its warehouse in S3 (a real S3 HTTP endpoint, moto's server), both set in the lake's
`chronolake.yaml`, as a user configures them. A random stream through the real broker and job; the
Python tools then read the job's commits from the same catalog and bucket, and every answer equals the
reference model. A catalog the job cannot open is refused in one line before anything starts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pytest
import sqlalchemy
import yaml

from chronolake.lake import Lake
from chronolake.streaming.broker import LocalKafkaBroker
from chronolake.streaming.runtime import JobRuntime, StreamJobSettings
from chronolake.streaming.transactions import UNROUTED_QUARANTINE
from tests.conftest import CHRONOLAKE
from tests.streaming.support import AssertionStream, Producer, StreamJob, check_stream_result, partition_of, wait_applied

TIMEOUT_S = 300.0  # readiness waits only
NAMESPACE = "streamed"  # the Postgres server is shared by the session's tests


@pytest.mark.integration
def test_stream_into_a_postgres_catalog_and_an_s3_warehouse(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, postgres_uri: str, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket="streamed-lake")
    home = tmp_path / "home"
    home.mkdir()
    (home / "chronolake.yaml").write_text(yaml.safe_dump({
        "namespace": NAMESPACE,
        "catalog": {
            "uri": postgres_uri,
            "warehouse": "s3://streamed-lake/warehouse",
            "s3.endpoint": s3_endpoint,
            "s3.access-key-id": "testing",
            "s3.secret-access-key": "testing",
            "s3.region": "us-east-1",
        },
    }))
    lake = Lake(home)
    prices = lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)

    events, partitions = 3_000, 2
    topic = "storage"
    kafka_broker.create_topic(topic, partitions=partitions)
    servers = kafka_broker.bootstrap_servers
    rng = random.Random(2718)
    stream = AssertionStream(seed=27, keys=60)
    producer = Producer(servers, topic)
    for index in range(events):
        if index % 500 == 17:  # broken JSON: the unrouted quarantine, in S3 too
            producer.send(rng.randrange(partitions), "bad", b'{"dataset": "prices", "k": ', UNROUTED_QUARANTINE)
            continue
        event = stream.event()
        producer.send(partition_of(event["k"], partitions), event["k"], json.dumps(event).encode())
    producer.flush()
    producer.close()
    bad = {where: table for where, table in producer.sent.items() if table is not None}

    settings = StreamJobSettings(
        home=home, datasets=["prices"], work_dir=tmp_path / "job", bootstrap_servers=servers, topic=topic,
        stable_interval_ms=500, idle_partition_ms=2000, restart_attempts=5,
    )
    job = StreamJob(settings, tmp_path / "job.log", job_runtime)
    try:
        job.start()
        records = wait_applied(job, servers, topic, partitions, prices, TIMEOUT_S)
        assert job.running(), "the job stopped"
    finally:
        job.kill()

    assert len(records) == events
    checked = check_stream_result(lake, prices, topic, records, bad, stream.keys, rng)
    assert checked.quarantined == len(bad) > 0 and checked.good + checked.quarantined == events

    # Where the job wrote: data files in the bucket, the catalog's rows in Postgres, nothing local.
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="streamed-lake") for o in page.get("Contents", [])]
    assert any(k.endswith(".parquet") and "/prices/data/" in k for k in keys)
    assert any(k.endswith(".parquet") and f"/{UNROUTED_QUARANTINE}/data/" in k for k in keys)
    assert not list(home.rglob("*.parquet")) and not (home / "catalog.db").exists()
    engine = sqlalchemy.create_engine(postgres_uri)
    with engine.connect() as connection:
        tables = connection.execute(
            sqlalchemy.text("select table_name from iceberg_tables where table_namespace = :ns"), {"ns": NAMESPACE}
        ).scalars().all()
    engine.dispose()
    assert {"prices", UNROUTED_QUARANTINE} <= set(tables)
    committed = prices.table.table.current_snapshot()
    assert committed is not None and committed.summary is not None
    assert "flink.max-committed-checkpoint-id" in committed.summary.additional_properties, "the Flink committer's commit"


def test_stream_refuses_a_catalog_it_cannot_open_in_one_line(lake_home: Path) -> None:
    result = subprocess.run(
        [CHRONOLAKE, "stream", "prices", "--run-for", "1"],
        capture_output=True, text=True, timeout=120,
        env={
            **os.environ, "CHRONOLAKE_HOME": str(lake_home),
            "CHRONOLAKE__CATALOG__TYPE": "rest", "CHRONOLAKE__CATALOG__URI": "http://127.0.0.1:1/catalog",
        },
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: the streaming job opens SQL catalogs (SQLite or PostgreSQL) only, not a 'rest' catalog"
    ]
    assert "broker" not in result.stdout + result.stderr
