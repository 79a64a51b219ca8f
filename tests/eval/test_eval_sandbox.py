import time

from spud.eval.sandbox import check_program, run_program


def test_passing_and_failing_solutions():
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    prompt = "def add(a, b):\n"
    ok = run_program(check_program(prompt, "    return a + b\n", test, "add"))
    assert ok.passed, ok.stderr
    bad = run_program(check_program(prompt, "    return a - b\n", test, "add"))
    assert bad.status == "failed" and "AssertionError" in bad.stderr
    broken = run_program(check_program(prompt, "    return (\n", test, "add"))
    assert broken.status == "failed" and "SyntaxError" in broken.stderr


def test_infinite_loop_times_out():
    start = time.monotonic()
    res = run_program("while True:\n    pass\n", timeout=1.5)
    assert res.status == "timeout"
    assert time.monotonic() - start < 10


def test_memory_bomb_fails_without_taking_the_machine_down():
    res = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", timeout=10, memory_mb=256)
    assert res.status == "failed" and "MemoryError" in res.stderr
    res = run_program("x = bytearray(8 * 1024**3)\n", memory_mb=256)
    assert res.status == "failed"


def test_network_is_refused():
    prog = ("import socket\n"
            "socket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    res = run_program(prog)
    assert res.status == "failed" and "network access is disabled" in res.stderr
    res = run_program("import socket\nsocket.getaddrinfo('example.com', 80)\n")
    assert res.status == "failed" and "PermissionError" in res.stderr


def test_writes_outside_the_sandbox_are_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    for prog in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import shutil\nopen('a.txt', 'w').write('x')\nshutil.copy('a.txt', {str(target)!r})\n",
    ):
        res = run_program(prog)
        assert res.status == "failed" and "PermissionError" in res.stderr, prog
        assert not target.exists()
    # writing inside its own directory is fine, and subprocesses are refused
    assert run_program("open('ok.txt', 'w').write('x')\nassert open('ok.txt').read() == 'x'\n").passed
    res = run_program(f"import subprocess\nsubprocess.run(['touch', {str(target)!r}])\n")
    assert res.status == "failed" and not target.exists()
