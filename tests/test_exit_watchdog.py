"""The suite's exit watchdog (tests/conftest.py): a test run whose tests all pass but whose
process cannot exit fails within the watchdog's time, printing where it is stuck, instead of
hanging CI until its cap."""

import os
import subprocess
import sys
from pathlib import Path


def test_a_run_that_cannot_exit_fails_with_the_stuck_threads_stack():
    probe = Path(__file__).with_name("exit_hang_probe.py")
    env = dict(os.environ, SPUD_TEST_EXIT_WATCHDOG_S="3")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(probe)],
                          capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parents[1])
    assert "1 passed" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1, (done.returncode, done.stderr)
    # faulthandler's dump: the main thread waits in threading._shutdown for the thread in wait()
    assert "Timeout" in done.stderr and "in _shutdown" in done.stderr and "in wait" in done.stderr, done.stderr
