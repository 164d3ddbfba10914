"""CloudWatch: the metrics the policy reads, and the decision metrics the Lambda publishes."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chronolake.scaling_lambda.exceptions import AwsCallError
from chronolake.scaling_lambda.policy import Decision, LagUnit

FLINK_NAMESPACE = "AWS/KinesisAnalytics"
TREND_POINTS = 3


class LagSource(enum.Enum):
    """Where consumer lag comes from."""

    KAFKA = "kafka"  # Flink Kafka connector: records_lag_max, published by Managed Flink
    MSK = "msk"  # Amazon MSK consumer-group lag: MaxOffsetLag
    KINESIS = "kinesis"  # Flink Kinesis connector: millisBehindLatest


@dataclass(frozen=True)
class MetricSpec:
    namespace: str
    name: str
    dimensions: Mapping[str, str]
    stat: str


@dataclass(frozen=True)
class MetricReadings:
    """Latest values over the look-back window; None when CloudWatch had no datapoint."""

    state_bytes: float | None = None
    lag: float | None = None
    lag_growth_per_second: float | None = None
    cpu_percent: float | None = None
    kpus: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "state_bytes": self.state_bytes,
            "lag": self.lag,
            "lag_growth_per_second": self.lag_growth_per_second,
            "cpu_percent": self.cpu_percent,
            "kpus": self.kpus,
        }


@dataclass(frozen=True)
class MetricQueries:
    """The four series the policy needs, for one application."""

    state: MetricSpec
    lag: MetricSpec
    cpu: MetricSpec
    kpus: MetricSpec
    window: timedelta = timedelta(minutes=10)
    period_seconds: int = 60


def lag_unit(source: LagSource) -> LagUnit:
    return LagUnit.MILLIS if source is LagSource.KINESIS else LagUnit.RECORDS


def queries_for(
    application: str,
    source: LagSource,
    *,
    state_metric: str = "lastCheckpointSize",
    msk_dimensions: Mapping[str, str] | None = None,
) -> MetricQueries:
    app = {"Application": application}
    if source is LagSource.KAFKA:
        lag = MetricSpec(FLINK_NAMESPACE, "records_lag_max", app, "Maximum")
    elif source is LagSource.KINESIS:
        lag = MetricSpec(FLINK_NAMESPACE, "millisBehindLatest", app, "Maximum")
    else:
        if not msk_dimensions:
            raise ValueError("MSK lag needs the 'Cluster Name', 'Consumer Group' and 'Topic' dimensions")
        lag = MetricSpec("AWS/Kafka", "MaxOffsetLag", dict(msk_dimensions), "Maximum")
    return MetricQueries(
        state=MetricSpec(FLINK_NAMESPACE, state_metric, app, "Maximum"),
        lag=lag,
        cpu=MetricSpec(FLINK_NAMESPACE, "containerCPUUtilization", app, "Average"),
        kpus=MetricSpec(FLINK_NAMESPACE, "KPUs", app, "Maximum"),
    )


def trend_per_second(points: Sequence[tuple[datetime, float]]) -> float | None:
    """Least-squares slope of a series, in units per second; None with fewer than two points."""
    if len(points) < 2:
        return None
    t0 = points[0][0]
    xs = [(t - t0).total_seconds() for t, _ in points]
    ys = [v for _, v in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var


def read_metrics(client: Any, queries: MetricQueries, now: datetime) -> MetricReadings:
    specs = {"state": queries.state, "lag": queries.lag, "cpu": queries.cpu, "kpus": queries.kpus}
    request = [
        {
            "Id": key,
            "MetricStat": {
                "Metric": {
                    "Namespace": spec.namespace,
                    "MetricName": spec.name,
                    "Dimensions": [{"Name": k, "Value": v} for k, v in spec.dimensions.items()],
                },
                "Period": queries.period_seconds,
                "Stat": spec.stat,
            },
            "ReturnData": True,
        }
        for key, spec in specs.items()
    ]
    try:
        # Four series over a short window stay far below one page (100,800 datapoints).
        response = client.get_metric_data(
            MetricDataQueries=request,
            StartTime=now - queries.window,
            EndTime=now,
            ScanBy="TimestampAscending",
        )
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "Unknown")
        raise AwsCallError("GetMetricData", code, str(error)) from error
    except BotoCoreError as error:
        raise AwsCallError("GetMetricData", type(error).__name__, str(error)) from error

    series: dict[str, list[tuple[datetime, float]]] = {}
    for result in response.get("MetricDataResults", []):
        points = sorted(zip(result.get("Timestamps", []), result.get("Values", [])))
        series[result["Id"]] = points

    def latest(key: str) -> float | None:
        points = series.get(key) or []
        return float(points[-1][1]) if points else None

    return MetricReadings(
        state_bytes=latest("state"),
        lag=latest("lag"),
        # Only the last few minutes: a window spanning a burst's rise and fall would average to a
        # rising trend while the backlog is already draining.
        lag_growth_per_second=trend_per_second((series.get("lag") or [])[-TREND_POINTS:]),
        cpu_percent=latest("cpu"),
        kpus=latest("kpus"),
    )


def publish_decision(client: Any, namespace: str, application: str, decision: Decision, now: datetime) -> None:
    app = [{"Name": "Application", "Value": application}]
    client.put_metric_data(
        Namespace=namespace,
        MetricData=[
            {
                "MetricName": "ScalingDecision",
                "Dimensions": app
                + [{"Name": "Action", "Value": decision.action.value}, {"Name": "Rule", "Value": decision.rule.value}],
                "Timestamp": now,
                "Value": 1.0,
                "Unit": "Count",
            },
            {"MetricName": "CurrentParallelism", "Dimensions": app, "Timestamp": now, "Value": float(decision.current_parallelism), "Unit": "Count"},
            {"MetricName": "TargetParallelism", "Dimensions": app, "Timestamp": now, "Value": float(decision.target_parallelism), "Unit": "Count"},
        ],
    )


def publish_error(client: Any, namespace: str, application: str, error_type: str, now: datetime) -> None:
    client.put_metric_data(
        Namespace=namespace,
        MetricData=[
            {
                "MetricName": "ScalingError",
                "Dimensions": [{"Name": "Application", "Value": application}, {"Name": "ErrorType", "Value": error_type}],
                "Timestamp": now,
                "Value": 1.0,
                "Unit": "Count",
            }
        ],
    )
