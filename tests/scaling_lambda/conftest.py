"""Shared fixtures: real botocore clients (service models loaded, nothing sent) and AWS call builders."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from chronolake.scaling_lambda.config import Settings
from chronolake.scaling_lambda.handler import Clients
from chronolake.scaling_lambda.policy import PolicyConfig

NOW = datetime(2025, 3, 14, 21, 15, tzinfo=timezone.utc)
APP = "chronolake-prod"
GB = 10**9


@pytest.fixture(autouse=True)
def _offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake credentials and region: the clients are stubbed or moto-backed and must never reach AWS.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")


@pytest.fixture
def settings() -> Settings:
    return Settings(
        policy=PolicyConfig(
            min_parallelism=2,
            max_parallelism=48,
            peak_parallelism=40,
            off_peak_parallelism=2,
            throughput_per_kpu=15_000,
        )
    )


class StubbedAws:
    """Botocore Stubber on both clients: every call is validated against the real service models."""

    def __init__(self) -> None:
        self.clients = Clients(
            flink=boto3.client("kinesisanalyticsv2", region_name="eu-west-1"),
            cloudwatch=boto3.client("cloudwatch", region_name="eu-west-1"),
        )
        self.flink = Stubber(self.clients.flink)
        self.cloudwatch = Stubber(self.clients.cloudwatch)

    def describe(
        self,
        *,
        status: str = "RUNNING",
        parallelism: int = 6,
        token: str | None = "token-7",
        autoscaling: bool = False,
        last_update: datetime = NOW - timedelta(hours=5),
        version: int = 7,
    ) -> None:
        self.flink.add_response(
            "describe_application",
            {"ApplicationDetail": application_detail(status, parallelism, token, autoscaling, last_update, version)},
            {"ApplicationName": APP},
        )

    def metrics(self, *, state_gb: float = 120.0, lag: list[float] | None = None, cpu: float = 20.0) -> None:
        lags = lag if lag is not None else [1_000.0, 1_000.0]
        stamps = [NOW - timedelta(minutes=len(lags) - i) for i in range(len(lags))]
        self.cloudwatch.add_response(
            "get_metric_data",
            {
                "MetricDataResults": [
                    {"Id": "state", "Timestamps": [stamps[-1]], "Values": [state_gb * GB], "StatusCode": "Complete"},
                    {"Id": "lag", "Timestamps": stamps, "Values": lags, "StatusCode": "Complete"},
                    {"Id": "cpu", "Timestamps": [stamps[-1]], "Values": [cpu], "StatusCode": "Complete"},
                    {"Id": "kpus", "Timestamps": [stamps[-1]], "Values": [7.0], "StatusCode": "Complete"},
                ]
            },
        )

    def update(self, parallelism: int, guard: dict[str, Any], new_version: int = 8) -> None:
        self.flink.add_response(
            "update_application",
            {"ApplicationDetail": application_detail("UPDATING", parallelism, "token-8", False, NOW, new_version)},
            {
                "ApplicationName": APP,
                "ApplicationConfigurationUpdate": {
                    "FlinkApplicationConfigurationUpdate": {
                        "ParallelismConfigurationUpdate": {
                            "ConfigurationTypeUpdate": "CUSTOM",
                            "ParallelismUpdate": parallelism,
                            "ParallelismPerKPUUpdate": 1,
                            "AutoScalingEnabledUpdate": False,
                        }
                    }
                },
                **guard,
            },
        )

    def put_metrics(self, count: int = 1) -> None:
        for _ in range(count):
            self.cloudwatch.add_response("put_metric_data", {})

    def assert_all_used(self) -> None:
        self.flink.assert_no_pending_responses()
        self.cloudwatch.assert_no_pending_responses()


def application_detail(
    status: str, parallelism: int, token: str | None, autoscaling: bool, last_update: datetime, version: int
) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "ApplicationARN": f"arn:aws:kinesisanalytics:eu-west-1:123456789012:application/{APP}",
        "ApplicationName": APP,
        "RuntimeEnvironment": "FLINK-1_20",
        "ApplicationStatus": status,
        "ApplicationVersionId": version,
        "LastUpdateTimestamp": last_update,
        "ApplicationConfigurationDescription": {
            "FlinkApplicationConfigurationDescription": {
                "ParallelismConfigurationDescription": {
                    "ConfigurationType": "CUSTOM",
                    "Parallelism": parallelism,
                    "ParallelismPerKPU": 1,
                    "CurrentParallelism": parallelism,
                    "AutoScalingEnabled": autoscaling,
                }
            }
        },
    }
    if token is not None:
        detail["ConditionalToken"] = token
    return detail


@pytest.fixture
def aws() -> Iterator[StubbedAws]:
    stubbed = StubbedAws()
    with stubbed.flink, stubbed.cloudwatch:
        yield stubbed
