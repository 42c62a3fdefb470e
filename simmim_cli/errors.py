"""The one exception type for problems a user can cause and fix."""


class SimmimError(Exception):
    """Bad input or settings. The CLI prints the message on one line and exits with code 2.

    The message names the problem and the fix, e.g.
    ``image size 200 is not a multiple of --mask-patch-size 32; use --img-size 192 or 224``.
    """
