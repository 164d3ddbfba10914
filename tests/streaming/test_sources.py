"""The job's sources without Flink: record coordinates, shard numbers, credentials, table options."""

from __future__ import annotations

import pytest

from chronolake.streaming.sources import (
    EMULATOR_CREDENTIALS,
    KafkaSource,
    KinesisSource,
    emulator_credentials,
    record_source,
    shard_number,
)

SEQUENCE = "49680429872286078725518590822489255615526426767622406162"


def test_kafka_records_are_named_by_topic_partition_and_offset() -> None:
    source = KafkaSource("assertions", "127.0.0.1:9092")
    assert record_source(source.name, 1, "17") == ("kafka:assertions/1@17", 17)


def test_kinesis_records_keep_their_full_sequence_number_and_have_no_line() -> None:
    source = KinesisSource("assertions", "eu-west-1")
    assert record_source(source.name, 7, SEQUENCE) == (f"kinesis:assertions/shardId-000000000007@{SEQUENCE}", None)


def test_a_shard_is_its_number_and_a_foreign_id_is_refused() -> None:
    assert shard_number("shardId-000000000007") == 7
    with pytest.raises(ValueError, match="unexpected Kinesis shard id"):
        shard_number("shard-7")


def test_only_a_loopback_endpoint_gets_dummy_credentials() -> None:
    assert emulator_credentials("http://127.0.0.1:4568") == EMULATOR_CREDENTIALS
    assert emulator_credentials("http://localhost:4568") == EMULATOR_CREDENTIALS
    assert emulator_credentials(None) is None
    assert emulator_credentials("https://kinesis.eu-west-1.amazonaws.com") is None


def test_kinesis_table_polls_from_the_oldest_record_with_the_right_credentials() -> None:
    local = KinesisSource("s", "us-east-1", "http://127.0.0.1:4568").ddl()
    assert "'aws.endpoint' = 'http://127.0.0.1:4568'" in local
    assert "'aws.credentials.provider' = 'BASIC'" in local
    assert "'scan.stream.initpos' = 'TRIM_HORIZON'" in local
    assert "'scan.stream.recordpublisher' = 'POLLING'" in local
    remote = KinesisSource("s", "eu-west-1").ddl()
    assert "'aws.credentials.provider' = 'AUTO'" in remote
    assert "aws.endpoint" not in remote and "accesskeyid" not in remote
