"""Lambda entry point: EventBridge Scheduler payload -> read application and metrics -> decide -> update.

Failures never raise out of the handler. Scheduler and Lambda async retries would replay a stale
decision; the next scheduled invocation decides again from fresh state instead. Each invocation makes
at most one UpdateApplication call, and botocore's retries are bounded (standard mode, 3 attempts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from chronolake.scaling_lambda.application import describe_application, update_parallelism
from chronolake.scaling_lambda.config import Settings
from chronolake.scaling_lambda.decision_log import log_event
from chronolake.scaling_lambda.exceptions import (
    ApplicationNotFoundError,
    AwsCallError,
    InvalidScheduleError,
    InvalidSettingsError,
    UpdateConflictError,
)
from chronolake.scaling_lambda.metrics import MetricReadings, publish_decision, publish_error, read_metrics
from chronolake.scaling_lambda.policy import Observation, decide
from chronolake.scaling_lambda.schedule import parse_schedule

# Three attempts in all, first included: a throttled control plane sees no storm from us.
RETRIES = {"mode": "standard", "total_max_attempts": 3}


@dataclass(frozen=True)
class Clients:
    flink: Any  # boto3 kinesisanalyticsv2 client
    cloudwatch: Any

    @classmethod
    def from_environment(cls) -> Clients:
        import boto3
        from botocore.config import Config

        config = Config(retries=RETRIES, connect_timeout=5, read_timeout=20)
        return cls(flink=boto3.client("kinesisanalyticsv2", config=config), cloudwatch=boto3.client("cloudwatch", config=config))


def _publish_error(clients: Clients, settings: Settings, application: str, error_type: str, now: datetime) -> None:
    try:
        publish_error(clients.cloudwatch, settings.metrics_namespace, application, error_type, now)
    except Exception as error:  # noqa: BLE001 - a metrics outage must not mask the original error
        log_event("metric_publish_failed", logging.WARNING, error=str(error))


def handle(event: Any, clients: Clients, settings: Settings, now: datetime) -> dict[str, Any]:
    """Run one schedule invocation; return a summary (also logged)."""
    try:
        request = parse_schedule(event)
    except InvalidScheduleError as error:
        application = event.get("application") if isinstance(event, Mapping) else None
        name = application if isinstance(application, str) else "unknown"
        _publish_error(clients, settings, name, "InvalidSchedule", now)
        return log_event("schedule_rejected", logging.ERROR, outcome="rejected", error=str(error), payload=event)

    app = request.application
    if settings.applications is not None and app not in settings.applications:
        _publish_error(clients, settings, app, "ApplicationNotAllowed", now)
        return log_event(
            "schedule_rejected", logging.ERROR, outcome="rejected", application=app,
            error=f"application {app!r} is not in CHRONOLAKE__SCALING__APPLICATIONS",
        )

    try:
        state = describe_application(clients.flink, app)
    except ApplicationNotFoundError as error:
        _publish_error(clients, settings, app, "ApplicationNotFound", now)
        return log_event("schedule_rejected", logging.ERROR, outcome="rejected", application=app, error=str(error))
    except AwsCallError as error:
        _publish_error(clients, settings, app, error.code, now)
        return log_event("aws_call_failed", logging.ERROR, outcome="error", application=app, operation=error.operation, code=error.code, error=str(error))

    try:
        readings = read_metrics(clients.cloudwatch, settings.queries(app), now)
    except AwsCallError as error:
        # Decide without metrics: the policy then refuses to scale down, so this is safe.
        log_event("metrics_unavailable", logging.ERROR, application=app, operation=error.operation, code=error.code, error=str(error))
        _publish_error(clients, settings, app, error.code, now)
        readings = MetricReadings()

    observation = Observation(
        now=now,
        status=state.status,
        parallelism=state.parallelism,
        parallelism_per_kpu=state.parallelism_per_kpu,
        autoscaling_enabled=state.autoscaling_enabled,
        configuration_type=state.configuration_type,
        last_update_at=state.last_update_at,
        state_bytes=readings.state_bytes,
        lag=readings.lag,
        lag_growth_per_second=readings.lag_growth_per_second,
        cpu_percent=readings.cpu_percent,
    )
    decision = decide(request, observation, settings.policy)
    inputs = {
        "application": app,
        "intent": request.intent.value,
        "requested_parallelism": request.parallelism,
        "scheduled_at": request.scheduled_at,
        "status": state.status,
        "version_id": state.version_id,
        "last_update_at": state.last_update_at,
        "configuration_type": state.configuration_type,
        "parallelism_per_kpu": state.parallelism_per_kpu,
        "autoscaling_enabled": state.autoscaling_enabled,
        "metrics": readings.to_dict(),
    }

    outcome = "no_op"
    new_version: int | None = None
    if decision.changes_application:
        try:
            new_version = update_parallelism(clients.flink, state, decision.target_parallelism, settings.policy.parallelism_per_kpu)
            outcome = "updated"
        except UpdateConflictError as error:
            # Another invocation (often a duplicate delivery of this one) got there first.
            log_event("update_superseded", logging.WARNING, application=app, error=str(error))
            outcome = "superseded"
        except AwsCallError as error:
            _publish_error(clients, settings, app, error.code, now)
            return log_event(
                "aws_call_failed", logging.ERROR, outcome="error", application=app, operation=error.operation,
                code=error.code, error=str(error), decision=decision.to_dict(), inputs=inputs,
            )

    try:
        publish_decision(clients.cloudwatch, settings.metrics_namespace, app, decision, now)
    except Exception as error:  # noqa: BLE001 - the decision stands even if its metric is lost
        log_event("metric_publish_failed", logging.WARNING, application=app, error=str(error))
    return log_event(
        "scaling_decision", outcome=outcome, decision=decision.to_dict(), inputs=inputs, new_version_id=new_version
    )


_clients: Clients | None = None


def handler(event: Any, context: Any) -> dict[str, Any]:
    """AWS Lambda entry point (`chronolake.scaling_lambda.handler.handler`)."""
    global _clients
    try:
        settings = Settings.from_environ(os.environ)
    except InvalidSettingsError as error:
        return log_event("settings_invalid", logging.ERROR, outcome="error", error=str(error))
    if _clients is None:
        _clients = Clients.from_environment()
    return handle(event, _clients, settings, datetime.now(timezone.utc))
