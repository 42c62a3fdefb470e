"""Errors a user can cause and fix, and whether to show tracebacks."""

import os


class SimmimError(Exception):
    """Bad input or settings. The CLI prints the message on one line and exits with ``exit_code``.

    The message names the problem and the fix, e.g.
    ``image size 200 is not a multiple of --mask-patch-size 32; use --img-size 192 or 224``.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class TrainingDiverged(SimmimError):
    """The loss stayed non-finite; the last good checkpoint is intact."""

    exit_code = 1


class RemoteError(SimmimError):
    """A remote shard could not be read (after the retries, or at once for a missing file or a refused login)."""

    exit_code = 74  # EX_IOERR, like storage faults: the newest checkpoint is the resume point

    def __init__(self, message: str, missing: bool = False, final: bool = False):
        super().__init__(message)
        self.missing = missing  # the file is not there (no retry can help)
        self.final = final or missing  # the store's answer does not change with retries


class AccessRefused(RemoteError):
    """The store refused the credentials (a login, a signature, a token): no retry or resume helps until they are
    fixed, hence an exit code of its own."""

    exit_code = 77  # EX_NOPERM

    def __init__(self, message: str):
        super().__init__(message, final=True)


class Interrupted(SimmimError):
    """Stopped by a signal after saving a checkpoint."""

    exit_code = 130


_debug = {"on": False}


def set_debug(enabled: bool) -> None:
    """``simmim --debug``: full tracebacks instead of one-line errors (also in launched workers)."""
    _debug["on"] = enabled
    if enabled:
        os.environ["SIMMIM_DEBUG"] = "1"
    else:
        os.environ.pop("SIMMIM_DEBUG", None)


def debug_enabled() -> bool:
    return _debug["on"] or os.environ.get("SIMMIM_DEBUG", "") not in ("", "0")
