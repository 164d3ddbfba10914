"""The Lambda handler against botocore's real service models (Stubber) and moto where it has the call."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from datetime import timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws

from chronolake.scaling_lambda import handler as handler_module
from chronolake.scaling_lambda.config import Settings
from chronolake.scaling_lambda.handler import Clients, handle

from conftest import APP, NOW, StubbedAws


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "chronolake.scaling"]


def test_handler_stubbed_botocore_peak_scales_up_guarded_by_conditional_token(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    aws.describe(parallelism=6, token="token-7")
    aws.metrics(state_gb=120, cpu=20.0)
    aws.update(40, {"ConditionalToken": "token-7"})
    aws.put_metrics()
    with caplog.at_level(logging.INFO):
        result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "updated"
    assert result["new_version_id"] == 8
    assert result["decision"]["action"] == "scale_up"
    assert result["decision"]["target_parallelism"] == 40
    (line,) = logged(caplog)
    assert line["event"] == "scaling_decision"
    assert line["inputs"]["metrics"]["state_bytes"] == 120e9
    assert line["inputs"]["version_id"] == 7


def test_handler_stubbed_botocore_uses_version_id_when_there_is_no_token(aws: StubbedAws, settings: Settings) -> None:
    aws.describe(parallelism=6, token=None, version=7)
    aws.metrics()
    aws.update(12, {"CurrentApplicationVersionId": 7})
    aws.put_metrics()
    result = handle({"application": APP, "intent": "scale_to", "parallelism": 12}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "updated"


def test_handler_stubbed_botocore_off_peak_stops_at_state_floor(aws: StubbedAws, settings: Settings) -> None:
    aws.describe(parallelism=40)
    aws.metrics(state_gb=140)  # 140 GB at 25 GB usable per KPU -> 6 KPUs, not the profile's 2
    aws.update(6, {"ConditionalToken": "token-7"})
    aws.put_metrics()
    result = handle({"application": APP, "intent": "off_peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["decision"]["target_parallelism"] == 6
    assert result["decision"]["rule"] == "state_floor"


def test_handler_stubbed_botocore_not_running_makes_no_update(aws: StubbedAws, settings: Settings) -> None:
    aws.describe(status="UPDATING")
    aws.metrics()
    aws.put_metrics()
    # No update_application response is queued: the Stubber fails the test if one is attempted.
    result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "no_op"
    assert result["decision"]["rule"] == "not_running"


def test_handler_stubbed_botocore_duplicate_delivery_updates_once(aws: StubbedAws, settings: Settings) -> None:
    payload = {"application": APP, "intent": "peak", "scheduled_at": (NOW - timedelta(seconds=5)).isoformat()}
    aws.describe(parallelism=6)
    aws.metrics()
    aws.update(40, {"ConditionalToken": "token-7"})
    aws.put_metrics()
    first = handle(payload, aws.clients, settings, NOW)
    # Second delivery of the same firing, after the rescale finished and the application runs again.
    aws.describe(parallelism=40, token="token-8", last_update=NOW, version=8)
    aws.metrics()
    aws.put_metrics()
    second = handle(payload, aws.clients, settings, NOW + timedelta(minutes=6))
    aws.assert_all_used()
    assert (first["outcome"], second["outcome"]) == ("updated", "no_op")
    assert second["decision"]["rule"] == "already_applied"


def test_handler_stubbed_botocore_concurrent_duplicate_is_superseded(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    aws.describe(parallelism=6)
    aws.metrics()
    aws.flink.add_client_error(
        "update_application", service_error_code="ConcurrentModificationException", http_status_code=400
    )
    aws.put_metrics()
    with caplog.at_level(logging.INFO):
        result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "superseded"
    assert [line["event"] for line in logged(caplog)] == ["update_superseded", "scaling_decision"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("peak", "payload must be a JSON object"),
        ({"intent": "peak"}, "'application'"),
        ({"application": "bad name!", "intent": "peak"}, "'application'"),
        ({"application": APP, "intent": "panic"}, "'intent' must be one of"),
        ({"application": APP, "intent": "scale_to"}, "needs 'parallelism'"),
        ({"application": APP, "intent": "scale_to", "parallelism": 0}, "needs 'parallelism'"),
        ({"application": APP, "intent": "scale_to", "parallelism": True}, "needs 'parallelism'"),
        ({"application": APP, "intent": "scale_to", "parallelism": "8"}, "needs 'parallelism'"),
        ({"application": APP, "intent": "peak", "parallelism": 8}, "only allowed with 'scale_to'"),
        ({"application": APP, "intent": "peak", "paralellism": 8}, "unknown payload keys: paralellism"),
        ({"application": APP, "intent": "peak", "scheduled_at": "yesterday"}, "ISO-8601"),
    ],
)
def test_handler_stubbed_botocore_rejects_malformed_payload_without_touching_the_application(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture, payload: Any, message: str
) -> None:
    aws.put_metrics()  # the ScalingError metric; no kinesisanalyticsv2 call is queued
    with caplog.at_level(logging.INFO):
        result = handle(payload, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "rejected"
    assert message in result["error"]
    (line,) = logged(caplog)
    assert line["event"] == "schedule_rejected"
    assert caplog.records[-1].levelno == logging.ERROR


def test_handler_stubbed_botocore_unknown_application_is_rejected(aws: StubbedAws, settings: Settings) -> None:
    aws.flink.add_client_error(
        "describe_application", service_error_code="ResourceNotFoundException", http_status_code=400,
        expected_params={"ApplicationName": APP},
    )
    aws.put_metrics()
    result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "rejected"
    assert "not found" in result["error"]


def test_handler_rejects_application_outside_the_allow_list_before_any_aws_read(
    aws: StubbedAws, settings: Settings
) -> None:
    aws.put_metrics()
    allowed = Settings(policy=settings.policy, applications=frozenset({"other-app"}))
    result = handle({"application": APP, "intent": "peak"}, aws.clients, allowed, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "rejected"


def test_handler_stubbed_botocore_throttled_describe_logs_error_and_stops(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    aws.flink.add_client_error("describe_application", service_error_code="ThrottlingException", http_status_code=400)
    aws.put_metrics()
    with caplog.at_level(logging.INFO):
        result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert (result["outcome"], result["code"], result["operation"]) == ("error", "ThrottlingException", "DescribeApplication")
    assert logged(caplog)[-1]["event"] == "aws_call_failed"


def test_handler_stubbed_botocore_failing_update_is_one_call_and_logged(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    aws.describe(parallelism=6)
    aws.metrics()
    aws.flink.add_client_error("update_application", service_error_code="LimitExceededException", http_status_code=400)
    aws.put_metrics()  # the error metric; no decision metric for an update that did not happen
    with caplog.at_level(logging.INFO):
        result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "error"
    assert result["code"] == "LimitExceededException"
    assert result["decision"]["target_parallelism"] == 40


def test_handler_stubbed_botocore_metrics_outage_scales_up_but_never_down(
    aws: StubbedAws, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    for intent, expected in (("peak", "updated"), ("off_peak", "no_op")):
        aws.describe(parallelism=6)
        aws.cloudwatch.add_client_error("get_metric_data", service_error_code="InternalServiceFault", http_status_code=500)
        aws.put_metrics()  # error metric
        if expected == "updated":
            aws.update(40, {"ConditionalToken": "token-7"})
        aws.put_metrics()  # decision metric
        result = handle({"application": APP, "intent": intent}, aws.clients, settings, NOW)
        assert result["outcome"] == expected
    aws.assert_all_used()
    assert result["decision"]["rule"] == "state_unknown"
    assert "metrics_unavailable" in [line["event"] for line in logged(caplog)]


def test_handler_stubbed_botocore_lost_decision_metric_does_not_undo_the_decision(
    aws: StubbedAws, settings: Settings
) -> None:
    aws.describe(parallelism=6)
    aws.metrics()
    aws.update(40, {"ConditionalToken": "token-7"})
    aws.cloudwatch.add_client_error("put_metric_data", service_error_code="Throttling", http_status_code=400)
    result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["outcome"] == "updated"


def test_handler_stubbed_botocore_decision_metrics_name_action_and_rule(aws: StubbedAws, settings: Settings) -> None:
    aws.describe(parallelism=40)
    aws.metrics()
    aws.cloudwatch.add_response(
        "put_metric_data",
        {},
        {
            "Namespace": "Chronolake/Scaling",
            "MetricData": [
                {
                    "MetricName": "ScalingDecision",
                    "Dimensions": [
                        {"Name": "Application", "Value": APP},
                        {"Name": "Action", "Value": "no_op"},
                        {"Name": "Rule", "Value": "at_target"},
                    ],
                    "Timestamp": NOW,
                    "Value": 1.0,
                    "Unit": "Count",
                },
                {"MetricName": "CurrentParallelism", "Dimensions": [{"Name": "Application", "Value": APP}], "Timestamp": NOW, "Value": 40.0, "Unit": "Count"},
                {"MetricName": "TargetParallelism", "Dimensions": [{"Name": "Application", "Value": APP}], "Timestamp": NOW, "Value": 40.0, "Unit": "Count"},
            ],
        },
    )
    result = handle({"application": APP, "intent": "peak"}, aws.clients, settings, NOW)
    aws.assert_all_used()
    assert result["decision"]["rule"] == "at_target"


def test_handler_stubbed_botocore_lambda_entry_point_reads_settings_from_environment(
    aws: StubbedAws, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHRONOLAKE__SCALING__PEAK_PARALLELISM", "24")
    monkeypatch.setenv("CHRONOLAKE__SCALING__MAX_PARALLELISM", "32")
    monkeypatch.setattr(handler_module, "_clients", aws.clients)
    aws.describe(parallelism=6)
    aws.cloudwatch.add_response("get_metric_data", {"MetricDataResults": []})
    aws.update(24, {"ConditionalToken": "token-7"})
    aws.put_metrics()
    result = handler_module.handler({"application": APP, "intent": "peak"}, None)
    aws.assert_all_used()
    assert result["decision"]["target_parallelism"] == 24


def test_handler_invalid_settings_are_one_logged_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOLAKE__SCALING__MAX_PARALLELISM", "lots")
    result = handler_module.handler({"application": APP, "intent": "peak"}, None)
    assert result["outcome"] == "error"
    assert "CHRONOLAKE__SCALING__MAX_PARALLELISM must be int" in result["error"]


def test_handler_throttled_control_plane_gets_three_attempts_then_one_logged_error(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loopback HTTP endpoint that always throttles stands in for the AWS control plane."""
    requests: list[str] = []

    class Throttling(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            requests.append(self.headers.get("X-Amz-Target", ""))
            body = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Throttling)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        clients = Clients.from_environment()
        result = handle({"application": APP, "intent": "peak"}, clients, settings, NOW)
    finally:
        server.shutdown()
        server.server_close()
    assert result["outcome"] == "error"
    assert result["code"] == "ThrottlingException"
    describes = [r for r in requests if r.endswith("DescribeApplication")]
    assert len(describes) == 3
    assert not [r for r in requests if r.endswith("UpdateApplication")]


@mock_aws
def test_handler_moto_ready_application_is_left_alone_and_the_decision_counted(settings: Settings) -> None:
    clients = Clients(
        flink=boto3.client("kinesisanalyticsv2", region_name="eu-west-1"),
        cloudwatch=boto3.client("cloudwatch", region_name="eu-west-1"),
    )
    iam = boto3.client("iam", region_name="eu-west-1")
    role = iam.create_role(RoleName="flink", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    clients.flink.create_application(
        ApplicationName=APP, RuntimeEnvironment="FLINK-1_20", ServiceExecutionRole=role
    )
    result = handle({"application": APP, "intent": "peak"}, clients, settings, NOW)
    assert result["outcome"] == "no_op"
    assert result["decision"]["rule"] == "not_running"
    metrics = clients.cloudwatch.list_metrics(Namespace="Chronolake/Scaling", MetricName="ScalingDecision")["Metrics"]
    dims = {d["Name"]: d["Value"] for d in metrics[0]["Dimensions"]}
    assert dims == {"Application": APP, "Action": "no_op", "Rule": "not_running"}
