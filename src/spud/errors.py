"""The one exception type users see.

The CLI prints a SpudError's message without a traceback and exits non-zero, so every message must
say what went wrong *and* what to do about it (which file, line, field or parameter).
"""


class SpudError(Exception):
    """An error caused by user input or environment, with an actionable message."""
