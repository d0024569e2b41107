"""User-facing errors: one line that says what was wrong and what to do."""


class MatchlockError(Exception):
    """An error the CLI prints as one line (no traceback) and exits non-zero with."""

    exit_code = 1


class UsageError(MatchlockError):
    """Bad flags or arguments."""


class NotFoundError(MatchlockError):
    """A named thing (image, VM, kernel) does not exist."""


class DependencyError(MatchlockError):
    """A host tool or package is missing; the message names what to install."""


class VmStartError(MatchlockError):
    """The VM did not boot or its guest runtime never became ready."""


class GuestError(MatchlockError):
    """The guest runtime misbehaved or the channel broke."""


class CommandTooLargeError(UsageError):
    """A command line or environment the guest could not exec (Linux ARG_MAX limits)."""


class RegistryError(MatchlockError):
    """A registry could not be reached, refused us, or sent something wrong."""


class IntegrityError(RegistryError):
    """Downloaded bytes do not match the digest they were asked for."""


class UnreachableError(RegistryError):
    """The registry (or its token service) could not be reached at all."""
