"""Errors meant for people: each becomes one line on stderr and an exit code (see README, "Exit codes")."""

from __future__ import annotations


class LdmError(Exception):
    """A failure the user can act on (exit code 1). The message is shown as one line, never a traceback."""

    exit_code = 1


class UsageError(LdmError):
    """Bad input on the command line or in a file the user named (exit code 2), raised before any expensive work."""

    exit_code = 2


class UnknownModelError(UsageError):
    """A model name that is not in the zoo."""


class OfflineError(LdmError):
    """A file is needed but network use is forbidden (``--offline`` / ``LDM_OFFLINE=1``)."""


class DownloadError(LdmError):
    """A download failed for good (4xx, retries exhausted, bad archive, no disk space)."""


class CheckpointError(LdmError):
    """A checkpoint that cannot be loaded safely or does not match its config."""


class RequestError(UsageError):
    """A bad value in a pipeline's request (exit code 2). ``field`` names the request's field; the CLI shows the
    option that sets it instead (``n_samples must be ...`` becomes ``--n_samples must be ...``)."""

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(detail)

    def for_option(self, option: str) -> str:
        """The message naming ``option`` where it names the field (``steps must be ...`` -> ``--steps must be ...``)."""
        if self.detail.startswith((self.field + " ", self.field + ":")):
            return option + self.detail[len(self.field):]
        return self.detail
