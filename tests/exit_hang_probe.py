"""Not collected by the suite (no test_ prefix): tests/test_exit_watchdog.py runs pytest on this
file. Its one test passes but leaves a non-daemon thread that never ends, which the interpreter
would join at exit for ever."""

import threading


def test_passes_but_leaves_a_thread_the_exit_would_wait_for():
    threading.Thread(target=threading.Event().wait, name="never-ends").start()
