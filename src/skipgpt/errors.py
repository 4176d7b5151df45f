"""The one exception type for user-facing bad input."""

__all__ = ["SkipGPTError"]


class SkipGPTError(ValueError):
    """Bad input from a user: the message is one line naming what is wrong and what is accepted.

    The CLI prints ``error: <message>`` and exits with status 2.
    """
