"""Errors raised by the rescaling Lambda."""


class ScalingError(Exception):
    """Base class for rescaling errors."""


class InvalidScheduleError(ScalingError):
    """The schedule payload is malformed; nothing was read or changed."""


class InvalidSettingsError(ScalingError):
    """A CHRONOLAKE__SCALING__* setting is missing or has the wrong type."""


class ApplicationNotFoundError(ScalingError):
    """The named Managed Flink application does not exist in this account and region."""


class AwsCallError(ScalingError):
    """An AWS API call failed (throttled, service error or rejected request)."""

    def __init__(self, operation: str, code: str, message: str) -> None:
        super().__init__(f"{operation} failed: {code}: {message}")
        self.operation = operation
        self.code = code


class UpdateConflictError(ScalingError):
    """The application changed between DescribeApplication and UpdateApplication."""
