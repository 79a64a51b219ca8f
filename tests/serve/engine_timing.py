"""Making a tiny model's requests last (a plain module: `from conftest import` is ambiguous).

The CPU decode step of a test-sized model takes well under a millisecond, so a stream of tens of
tokens can end before a test's next HTTP call lands; tests that need a request still running
slow the engine's decode step itself (on the CPU it does not go through model.forward_slots)."""

from __future__ import annotations

import time


def slow_down(engine, seconds: float, monkeypatch=None) -> None:
    """Each decode step of `engine` sleeps `seconds` first: a request of many tokens then takes
    long, deterministically. With `monkeypatch` (a shared engine) it is undone after the test."""
    real = engine._decode_step

    def step():
        time.sleep(seconds)
        real()

    if monkeypatch is None:
        engine._decode_step = step
    else:
        monkeypatch.setattr(engine, "_decode_step", step)
