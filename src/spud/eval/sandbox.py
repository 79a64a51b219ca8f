"""Run model-written code with its unit tests in a constrained child process.

What the sandbox does (each line is a guard against *accidental* damage by generated code):

- a fresh temporary directory is the working directory, HOME and TMPDIR, and is deleted after;
- `python -I` (isolated mode): no PYTHON* environment variables, no user site-packages, and the
  script's directory is not on sys.path, so the program cannot shadow modules;
- a time limit: the child runs in its own session/process group and the whole group is killed
  with SIGKILL on timeout (an infinite loop that forked cannot survive it); RLIMIT_CPU backs it up;
- a memory limit: RLIMIT_AS set in preexec_fn, so a memory bomb gets MemoryError instead of
  taking the machine down; RLIMIT_FSIZE caps the size of any file it writes;
- no network: a prelude installs a `sys.addaudithook` hook (hooks cannot be removed once added)
  that refuses socket creation, connect, bind, getaddrinfo; proxy variables point nowhere;
- no writes outside the temp dir: the same hook refuses `open` with a write mode/flag, and
  remove/rename/mkdir/chmod/symlink..., on paths outside it; spawning processes (subprocess,
  os.system, exec, fork) is refused too, since a child process would not carry the hook.

Honest limits: audit hooks are a tripwire, not a security boundary. Code that deliberately uses
ctypes or writes through /proc can get around them. That is fine for scoring a model's answers
on public benchmarks; to run untrusted, adversarial code use a container or VM (no network
namespace, read-only root) around `spud eval`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
MAX_OUTPUT_CHARS = 4000

# Runs in the child before the program. Kept dependency-free: only stdlib, only at start-up.
_PRELUDE = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_NET = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg"}
_SPAWN = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
          "os.forkpty", "pty.spawn", "os.startfile"}
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2,
                "os.replace": 2, "os.link": 2, "os.symlink": 2, "shutil.copyfile": 2,
                "shutil.copytree": 2, "shutil.move": 2}

def _inside(path):
    if isinstance(path, int):  # an already-open file descriptor
        return True
    try:
        p = os.fsdecode(path)
    except TypeError:
        return True
    full = os.path.realpath(os.path.join(_ROOT, p))
    return full == _ROOT or full.startswith(_ROOT + os.sep)

def _hook(event, args):
    if event in _NET:
        raise PermissionError("network access is disabled in the spud sandbox")
    if event in _SPAWN:
        raise PermissionError("starting processes is disabled in the spud sandbox")
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            raise PermissionError(f"writing outside the sandbox directory is disabled: {path!r}")
    n = _PATH_EVENTS.get(event)
    if n:
        for p in tuple(args)[:n]:
            if p is not None and not _inside(p):
                raise PermissionError(f"{event} outside the sandbox directory is disabled: {p!r}")

sys.addaudithook(_hook)
del _hook
_src = open("program.py", encoding="utf-8").read()
_g = {"__name__": "__main__", "__file__": "program.py", "__builtins__": __builtins__}
exec(compile(_src, "program.py", "exec"), _g)
'''


@dataclass
class SandboxResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(memory_mb: int, cpu_s: int):
    def apply() -> None:
        import resource  # only in the child, after fork: just syscalls, no locks

        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(
    program: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> SandboxResult:
    """Run `program` (Python source) in the sandbox. Passed = exit code 0 within the limits."""
    tmp = tempfile.mkdtemp(prefix="spud-sandbox-")
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(_PRELUDE)
        env = {
            "PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            # belt and braces for libraries that honour proxies: point them at a closed port
            "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "no_proxy": "", "OMP_NUM_THREADS": "1",
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "main.py"], cwd=tmp, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: killpg reaches its children too
            # preexec_fn only calls setrlimit between fork and exec (no locks taken), which is
            # the documented-safe subset even when the parent has threads (torch's pool)
            preexec_fn=_limits(memory_mb, int(timeout) + 1),  # noqa: PLW1509
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        seconds = time.monotonic() - start
        # killed by a signal: SIGXCPU (the CPU limit) counts as a timeout
        rc = proc.returncode
        if status == "failed" and rc is not None and -rc in (signal.SIGXCPU, signal.SIGKILL):
            status = "timeout"
        return SandboxResult(
            status, proc.returncode,
            out.decode("utf-8", "replace")[-MAX_OUTPUT_CHARS:],
            err.decode("utf-8", "replace")[-MAX_OUTPUT_CHARS:], seconds,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_program(prompt: str, completion: str, test: str, entry_point: str | None) -> str:
    """The HumanEval/MBPP program: the function (prompt + completion), its tests, and the call
    to `check(entry_point)` (HumanEval) — MBPP-style tests are bare asserts and need no call."""
    parts = [prompt + completion, "", test]
    if entry_point:
        parts.append(f"\ncheck({entry_point})")
    return "\n".join(parts) + "\n"
