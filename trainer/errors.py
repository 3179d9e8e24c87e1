"""Typed errors of the trainer. The CLI prints their message and exits with `exit_code`."""


class TrainerError(Exception):
    """Something went wrong that the user can act on; exit code 1."""

    exit_code = 1


class UsageError(TrainerError):
    """Bad flags or an unusable base model; exit code 2."""

    exit_code = 2


class DataError(UsageError):
    """The training or validation data is malformed; exit code 2."""


class AdapterFormatError(TrainerError):
    """A saved adapter folder does not follow docs/adapter-format.md."""


class PushError(TrainerError):
    """The server could not be reached or refused the adapter."""
