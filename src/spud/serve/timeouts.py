"""Per-request timeout (`spud serve --request-timeout S`, Engine `request_timeout`).

A request older than the timeout (counted from submit, so time spent queued counts too: the
client waits either way) is finished with reason "timeout" at the engine's next step, wherever it
is (queued, prefilling or decoding); its slot is free for the next request at once. The API
answers it as an OpenAI-shaped error (408 `timeout`), in-band when streaming. The check runs
once per engine step, so the overshoot is at most one step (milliseconds to one prefill chunk).
"""

from __future__ import annotations

import time

TIMEOUT_REASON = "timeout"


def timeout_message(seconds: float) -> str:
    return (f"the request took longer than the server's request timeout of {seconds:g} s "
            "(spud serve --request-timeout); ask for fewer tokens or retry")


def expire_overdue(engine) -> None:
    """Engine thread only: finish every request submitted more than request_timeout ago."""
    limit = engine.request_timeout
    now = time.perf_counter()
    with engine._cv:
        queued = [s for s in engine._waiting if now - s.handle.submitted > limit]
        for s in queued:
            engine._waiting.remove(s)
    active = [s for s in [*engine._prefilling, *engine._running] if now - s.handle.submitted > limit]
    for s in queued + active:
        engine._finish(s, TIMEOUT_REASON, timeout_message(limit))
