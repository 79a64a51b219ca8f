"""One place that decides how terminal output looks.

Rich wraps at 80 columns when stdout is not a terminal (pipes, CI logs, tests), which breaks
tables and long lines; a wide fixed width keeps logs greppable.
"""

from __future__ import annotations

import sys

from rich.console import Console


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)
