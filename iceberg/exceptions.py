"""Errors a user can cause, each printed by the CLI as one line."""


class ChronolakeError(Exception):
    """Base class of the errors chronolake reports to users."""


class ConfigError(ChronolakeError):
    """A dataset declaration or lake setting is invalid."""


class DatasetNotFound(ChronolakeError):
    """No dataset of that name exists in the lake."""


class DatasetAlreadyExists(ChronolakeError):
    """A dataset of that name already exists with a different declaration."""


class UnreadableFile(ChronolakeError):
    """An input file cannot be read at all; nothing was written."""


class UnstableRead(ChronolakeError):
    """A query asked about a system time beyond the dataset's stable system time."""


class SystemTimeError(ChronolakeError):
    """A requested system time would move transaction time backwards."""


class CommitConflict(ChronolakeError):
    """Another writer committed to the dataset while this transaction was being prepared."""
