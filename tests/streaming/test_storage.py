"""The bitemporal job on other storage than the embedded default, set in the lake's `chronolake.yaml`
as a user configures it: the catalog in PostgreSQL (a real server) or in AWS Glue (faked by moto's
server: no real Glue runs here), the warehouse in S3 (a real S3 HTTP endpoint, moto's server). A
random stream through the real broker and job; the Python tools then read the job's commits from the
same catalog and bucket, and every answer equals the reference model. A catalog the job cannot open
is refused in one line before anything starts.
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


def stream_random_events(
    lake: Lake, kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, tmp_path: Path, topic: str
) -> None:
    """A random stream (with a few broken records) through the broker and the job into `lake`'s
    `prices`; then every answer against the reference model, as the Python tools read the lake."""
    prices = lake.dataset("prices")
    events, partitions = 3_000, 2
    kafka_broker.create_topic(topic, partitions=partitions)
    servers = kafka_broker.bootstrap_servers
    rng = random.Random(2718)
    stream = AssertionStream(seed=27, keys=60)
    producer = Producer(servers, topic)
    for index in range(events):
        if index % 500 == 17:  # broken JSON: the unrouted quarantine, in the same warehouse
            producer.send(rng.randrange(partitions), "bad", b'{"dataset": "prices", "k": ', UNROUTED_QUARANTINE)
            continue
        event = stream.event()
        producer.send(partition_of(event["k"], partitions), event["k"], json.dumps(event).encode())
    producer.flush()
    producer.close()
    bad = {where: table for where, table in producer.sent.items() if table is not None}

    settings = StreamJobSettings(
        home=lake.settings.home, datasets=["prices"], work_dir=tmp_path / "job", bootstrap_servers=servers,
        topic=topic, stable_interval_ms=500, idle_partition_ms=2000, restart_attempts=5,
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
    committed = prices.table.table.current_snapshot()
    assert committed is not None and committed.summary is not None
    assert "flink.max-committed-checkpoint-id" in committed.summary.additional_properties, "the Flink committer's commit"


def bucket_with_lake(s3_endpoint: str, bucket: str) -> Any:
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    s3.create_bucket(Bucket=bucket)
    return s3


def check_files_in_bucket(s3: Any, bucket: str, home: Path) -> None:
    """The job's data files are in the bucket, none on the local disk."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    assert any(k.endswith(".parquet") and "/prices/data/" in k for k in keys)
    assert any(k.endswith(".parquet") and f"/{UNROUTED_QUARANTINE}/data/" in k for k in keys)
    assert not list(home.rglob("*.parquet")) and not (home / "catalog.db").exists()


def write_settings(home: Path, namespace: str, catalog: dict[str, str]) -> None:
    home.mkdir()
    (home / "chronolake.yaml").write_text(yaml.safe_dump({"namespace": namespace, "catalog": catalog}))


@pytest.mark.integration
def test_stream_into_a_postgres_catalog_and_an_s3_warehouse(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, postgres_uri: str, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = bucket_with_lake(s3_endpoint, "streamed-lake")
    home = tmp_path / "home"
    write_settings(home, "streamed", {
        "uri": postgres_uri,
        "warehouse": "s3://streamed-lake/warehouse",
        "s3.endpoint": s3_endpoint,
        "s3.access-key-id": "testing",
        "s3.secret-access-key": "testing",
        "s3.region": "us-east-1",
    })
    lake = Lake(home)
    lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)

    stream_random_events(lake, kafka_broker, job_runtime, tmp_path, "storage-postgres")

    check_files_in_bucket(s3, "streamed-lake", home)
    engine = sqlalchemy.create_engine(postgres_uri)
    with engine.connect() as connection:
        tables = connection.execute(
            sqlalchemy.text("select table_name from iceberg_tables where table_namespace = 'streamed'")
        ).scalars().all()
    engine.dispose()
    assert {"prices", UNROUTED_QUARANTINE} <= set(tables)


@pytest.mark.integration
def test_stream_into_a_glue_catalog_faked_by_moto_and_an_s3_warehouse(
    kafka_broker: LocalKafkaBroker, job_runtime: JobRuntime, s3_endpoint: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Glue is an AWS control-plane API: moto's server stands in for it (the S3 endpoint is real HTTP
    on the same server). The job's Glue client takes its credentials from the environment."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = bucket_with_lake(s3_endpoint, "glued-lake")
    home = tmp_path / "home"
    write_settings(home, "glued", {
        "type": "glue",
        "glue.endpoint": s3_endpoint,
        "glue.region": "us-east-1",
        "warehouse": "s3://glued-lake/warehouse",
        "s3.endpoint": s3_endpoint,
        "s3.region": "us-east-1",
    })
    lake = Lake(home)
    lake.create_dataset("prices", key=["k"], columns={"x": "long"}, buckets=1)

    stream_random_events(lake, kafka_broker, job_runtime, tmp_path, "storage-glue")

    check_files_in_bucket(s3, "glued-lake", home)
    glue = boto3.client("glue", endpoint_url=s3_endpoint, region_name="us-east-1")
    table = glue.get_table(DatabaseName="glued", Name="prices")["Table"]
    location = table["Parameters"]["metadata_location"]
    assert location.startswith("s3://glued-lake/warehouse/")
    assert location == lake.dataset("prices").table.table.metadata_location, "Glue points at the job's last commit"


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
        "error: the streaming job opens SQL catalogs (SQLite or PostgreSQL) and AWS Glue only, not a 'rest' catalog"
    ]
    assert "broker" not in result.stdout + result.stderr
