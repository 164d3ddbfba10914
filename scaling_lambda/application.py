"""Reading and updating the Managed Flink application (kinesisanalyticsv2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chronolake.scaling_lambda.exceptions import ApplicationNotFoundError, AwsCallError, UpdateConflictError


@dataclass(frozen=True)
class ApplicationState:
    """The parts of DescribeApplication the policy and the guarded update need."""

    name: str
    status: str
    version_id: int
    conditional_token: str | None
    last_update_at: datetime | None
    configuration_type: str
    parallelism: int
    parallelism_per_kpu: int
    autoscaling_enabled: bool


def describe_application(client: Any, name: str) -> ApplicationState:
    try:
        detail = client.describe_application(ApplicationName=name)["ApplicationDetail"]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "Unknown")
        if code == "ResourceNotFoundException":
            raise ApplicationNotFoundError(f"Managed Flink application {name!r} not found") from error
        raise AwsCallError("DescribeApplication", code, str(error)) from error
    except BotoCoreError as error:
        raise AwsCallError("DescribeApplication", type(error).__name__, str(error)) from error

    flink = detail.get("ApplicationConfigurationDescription", {}).get("FlinkApplicationConfigurationDescription", {})
    parallelism = flink.get("ParallelismConfigurationDescription", {})
    return ApplicationState(
        name=name,
        status=detail["ApplicationStatus"],
        version_id=detail["ApplicationVersionId"],
        conditional_token=detail.get("ConditionalToken"),
        last_update_at=detail.get("LastUpdateTimestamp"),
        configuration_type=parallelism.get("ConfigurationType", "DEFAULT"),
        # CurrentParallelism is what runs now; Parallelism is what was last configured.
        parallelism=parallelism.get("CurrentParallelism", parallelism.get("Parallelism", 1)),
        parallelism_per_kpu=parallelism.get("ParallelismPerKPU", 1),
        autoscaling_enabled=parallelism.get("AutoScalingEnabled", False),
    )


def update_request(state: ApplicationState, parallelism: int, parallelism_per_kpu: int) -> dict[str, Any]:
    """UpdateApplication arguments that change only the parallelism, guarded against races."""
    request: dict[str, Any] = {
        "ApplicationName": state.name,
        "ApplicationConfigurationUpdate": {
            "FlinkApplicationConfigurationUpdate": {
                "ParallelismConfigurationUpdate": {
                    "ConfigurationTypeUpdate": "CUSTOM",
                    "ParallelismUpdate": parallelism,
                    "ParallelismPerKPUUpdate": parallelism_per_kpu,
                    # Managed Flink's own autoscaler would fight the schedule and ignore the state floor.
                    "AutoScalingEnabledUpdate": False,
                }
            }
        },
    }
    # The service accepts one guard; the token is preferred when the application has one.
    if state.conditional_token:
        request["ConditionalToken"] = state.conditional_token
    else:
        request["CurrentApplicationVersionId"] = state.version_id
    return request


def update_parallelism(client: Any, state: ApplicationState, parallelism: int, parallelism_per_kpu: int) -> int:
    """Apply the update; return the new application version id."""
    try:
        response = client.update_application(**update_request(state, parallelism, parallelism_per_kpu))
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "Unknown")
        if code in ("ConcurrentModificationException", "ResourceInUseException"):
            raise UpdateConflictError(
                f"{state.name} changed or is busy since version {state.version_id}: {code}"
            ) from error
        raise AwsCallError("UpdateApplication", code, str(error)) from error
    except BotoCoreError as error:
        raise AwsCallError("UpdateApplication", type(error).__name__, str(error)) from error
    version: int = response["ApplicationDetail"]["ApplicationVersionId"]
    return version
