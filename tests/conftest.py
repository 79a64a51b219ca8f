import os
import shutil
from pathlib import Path

import pytest

# Measured peaks and other caches go to a per-session temp dir, never the user's home.
os.environ.setdefault("SPUD_CACHE_DIR", str(Path(__file__).parent / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from tiny_recipe import TINY_OVERRIDES  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_cfg():
    from spud.config import load_config

    return load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", TINY_OVERRIDES)


@pytest.fixture(scope="session")
def built_run(tiny_cfg, tmp_path_factory) -> Path:
    """A run directory with tokenizer and data built once per session (read-only for tests)."""
    from spud.data.build import build_dataset

    run = tmp_path_factory.mktemp("built") / "run"
    build_dataset(tiny_cfg, run, progress=False, log=lambda *a, **k: None)
    return run


@pytest.fixture
def fresh_run(built_run, tmp_path) -> Path:
    """A private copy of the built run (data + tokenizer, no checkpoints) for a test to train in."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(built_run / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(built_run / "data", run / "data")
    return run


# After the last test the interpreter still has to exit, and first it joins every non-daemon
# thread (executor manager threads among them) and multiprocessing child. One left stuck by a
# test would hang CI, silently, until its time cap: a CI run once printed "1052 passed" and then
# nothing until it was killed at 90 minutes. So once pytest is done, a watchdog waits this long,
# then prints every thread's stack and fails the run (exit status 1). tests/test_exit_watchdog.py
EXIT_WATCHDOG_S = float(os.environ.get("SPUD_TEST_EXIT_WATCHDOG_S", "180"))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True, file=sys.__stderr__)
