"""A dead data-build worker, in a process of its own: `python dead_worker_scenario.py TOKENIZER
SCENARIO`. The build must fail with its SpudError *and this process must then exit*: CPython's
executor leaves threads behind that the interpreter joins at exit, so a clean-up that misses one
hangs the process after the error (run in-process, it would hang the whole test suite instead of
failing one test). Prints one JSON line: the error, and what is still alive after terminate().

Scenarios:
- feeding: the worker is killed while the build keeps it busy (chunks queued behind it).
- mid-send: the worker dies in the middle of sending a result: part of a message is left in the
  result pipe, so the executor's manager thread blocks reading the rest.
- after-cut: the build stops reading a source early (a budget cut) with chunks still queued, the
  worker dies, and the next source fails.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import threading
import time

from spud.data.workers import PreparePool
from spud.errors import SpudError
from spud.tokenizer import Tokenizer


def pages(n: int):
    def read(stats):
        for i in range(n):
            yield " ".join(f"word{(i * 7 + k) % 50}" for k in range(300)), 0.0, f"doc{i}"
    return read


def kill_workers(pool: PreparePool) -> None:
    for p in pool._workers():
        p.kill()


def main(tokenizer: str, scenario: str) -> dict:
    pool = PreparePool(1, Tokenizer.load(tokenizer), [])
    records = pool.records(0, pages(20_000), None, False)
    next(records)
    manager, workers = pool._pool._executor_manager_thread, pool._workers()
    error = None
    try:
        if scenario == "feeding":
            kill_workers(pool)
        elif scenario == "mid-send":
            for p in pool._workers():  # hold the worker so nothing else reaches the pipe
                os.kill(p.pid, signal.SIGSTOP)
            time.sleep(0.5)
            # a message header announcing 1000 bytes, and 10 of them
            os.write(pool._pool._result_queue._writer.fileno(), struct.pack("!i", 1000) + b"x" * 10)
            time.sleep(0.5)  # the manager thread is now blocked in recv
            kill_workers(pool)
        elif scenario == "after-cut":
            records.close()  # chunks still queued for the worker
            kill_workers(pool)
            records = pool.records(0, pages(20_000), None, False)  # the next source
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        for _ in records:
            pass
    except SpudError as e:
        error = str(e)
    finally:
        pool.terminate()
    return {"error": error,
            "manager_alive": manager.is_alive(),
            "threads_alive": sorted(t.name for t in threading.enumerate()
                                    if t is not threading.main_thread() and not t.daemon),
            "workers_alive": sum(p.is_alive() for p in workers)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
