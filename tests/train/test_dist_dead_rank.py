"""A rank that dies (SIGKILL, as when a node is lost) must not leave the others hanging."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spud.train.metrics import read_metrics

from tiny_recipe import TINY_OVERRIDES

ROOT = Path(__file__).parents[2]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_one_rank_stops_the_others_promptly(fresh_run):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "spud", "train", str(ROOT / "configs" / "tiny.yaml"), *TINY_OVERRIDES,
           "train.max_steps=100000", "train.eval_every=100000", "train.checkpoint_every=100000",
           "train.parallel=ddp", "train.micro_batch_size=2", "train.dist_timeout_s=20", "--out", str(fresh_run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if sum(r["kind"] == "train" for r in read_metrics(fresh_run / "metrics.jsonl")) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError("training never started")
        workers = [p for p in children(proc.pid) if rank_of(p) is not None]
        victim = next(p for p in workers if rank_of(p) == 1)
        survivor = next(p for p in workers if rank_of(p) == 0)
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        proc.wait(timeout=90)  # never a hang: well within the collective timeout plus teardown
        assert proc.returncode != 0
        assert time.time() - t0 < 90
        for _ in range(50):
            if not alive(survivor):
                break
            time.sleep(0.1)
        assert not alive(survivor), "rank 0 outlived the job"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
