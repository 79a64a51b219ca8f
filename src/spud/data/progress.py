"""The build's progress bar: tokens written of the mix's total, with a rate and an ETA."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

PROGRESS_EVERY_TOKENS = 1 << 16


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class _TokensColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{_si(task.completed)}/{_si(task.total or 0)} tokens")


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{_si(speed)} tok/s" if speed else "- tok/s")


class TokenBar:
    """A rich progress bar, or nothing when disabled (tests, logs redirected to files)."""

    def __init__(self, enabled: bool, total: int):
        self._progress = None
        self._pending = 0
        if enabled:
            columns = [TextColumn("[bold]{task.description:<14}"), BarColumn(), _TokensColumn(),
                       _RateColumn(), TimeRemainingColumn()]
            self._progress = Progress(*columns)
            self._task = self._progress.add_task("tokenizing", total=total)

    def __enter__(self) -> TokenBar:
        if self._progress:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.flush()
        if self._progress:
            self._progress.stop()

    def describe(self, name: str) -> None:
        if self._progress:
            self._progress.update(self._task, description=name)

    def advance(self, tokens: int) -> None:
        self._pending += tokens  # batched: one rich update per 64k tokens, not per document
        if self._pending >= PROGRESS_EVERY_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._progress and self._pending:
            self._progress.advance(self._task, self._pending)
        self._pending = 0
