"""Worker processes for `spud data build` (`data.workers`, `--workers N`).

What costs CPU in a build is per document and depends on nothing but the document: the quality
rules (pure Python), the dedup keys (NFKC content hash, MinHash signature) and the tokens. What
must stay in order is cheap: reading records, counting them, the dedup *decision* (a document is a
duplicate only of documents before it), the split, budgets and shard writing. So the build's own
process still reads every source and decides everything, in exactly the order of a one-process
build, while N spawned workers compute the per-document results ahead of it, chunk by chunk:

- `PreparePool.records` reads a source ahead in chunks of ~256 KB and submits each chunk to the
  pool; at most 3 chunks per worker are in flight, so memory is bounded whatever the corpus size
  (multiprocessing's `imap` would read its whole input first).
- The reader's counting (files, bad records, blank lines, ...) is recorded while reading ahead
  and replayed on the source's real counts only when the build reaches that record: a source cut
  at its budget counts exactly what a one-process build counts, not what was read ahead.
- Each result (`Prepared`) carries the quality verdict, the dedup keys and the tokens of every
  piece the build will cut the document into; `DocumentFilter.judge` charges the verdict and
  decides the duplicate from the keys, `mix.encoded_documents` takes the tokens.

Hence the output is byte-identical to `data.workers: 1` (tests/data/test_data_workers.py). What a
worker computes for a document the build then drops (a duplicate, a record past a budget cut) is
wasted, at most the in-flight chunks per source. Each worker tokenizes on one thread, so N
workers use N cores; the build's own process reads and writes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from spud.data.records import MAX_DOCUMENT_BYTES, encodable_part, nontext_reason, text_pieces
from spud.errors import SpudError

CHUNK_BYTES = 256 << 10
MIN_CHUNK_BYTES = 16 << 10
CHUNK_RECORDS = 512
IN_FLIGHT_PER_WORKER = 3
# How often a wait for a chunk checks that every worker is still alive (PreparePool._result).
WORKER_POLL_S = 1.0
# How long terminate() waits for killed workers and the executor's manager thread to finish.
MANAGER_EXIT_S = 10.0
MAX_AUTO_WORKERS = 8
AUTO_MIN_TOKENS = 2_000_000


class Prepared(NamedTuple):
    verdict: tuple[str, str] | None  # (rule, reason) when a quality rule drops the document
    nbytes: int  # UTF-8 length as the rules and dedup count it (errors replaced)
    content_hash: bytes | None  # exact-dedup key (None: exact dedup off, or not judged)
    signature: object | None  # rensa RMinHash (None: near dedup off, or not judged)
    tokens: list[np.ndarray] | None  # [BOS, ids...] per piece of the document; None: not encoded


def resolve_workers(workers: int, cleaning: bool, total_tokens: int) -> int:
    """data.workers → worker processes (1 = none: all in the build's process). 0 = automatic:
    one per core (at most 8) when any source is cleaned or deduplicated, whose pure-Python rules
    and hashing gain from processes, and the build is big enough (AUTO_MIN_TOKENS) to repay the
    workers' start (about 1.5 s each, importing spud). Otherwise 1: the tokenizer alone already
    runs on all cores in Rust threads, and processes would only add the cost of shipping text."""
    if workers:
        return workers
    return min(os.cpu_count() or 1, MAX_AUTO_WORKERS) if cleaning and total_tokens >= AUTO_MIN_TOKENS else 1


# ----------------------------------------------------------------------------- in each worker
_STATE: dict = {}


def _init(tokenizer_json: str, qualities: list, dedup) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: N workers use N cores
    from tokenizers import Tokenizer as HFTokenizer  # noqa: PLC0415

    from spud.tokenizer import Tokenizer  # noqa: PLC0415

    _STATE.update(tokenizer=Tokenizer(HFTokenizer.from_str(tokenizer_json)), qualities=qualities, dedup=dedup)


def own_peak_rss_mb() -> float:
    """This process's peak RSS since it started its program, in MB. Linux's VmHWM, not getrusage:
    ru_maxrss survives exec, so a spawned worker would report the parent's size at the fork."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # noqa: PLC0415 - elsewhere (macOS: bytes) the getrusage figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _prepare_chunk(source: int, first_pass: bool, items: list[tuple[str, bool]]) -> tuple[list, float]:
    """items: (record text, judged) — judged is False for the later pieces of one long file,
    which Source.documents never judges. Mirrors Source.documents' per-record work."""
    from spud.data.dedup import content_hash  # noqa: PLC0415

    tok, qualities, dedup = _STATE["tokenizer"], _STATE["qualities"], _STATE["dedup"]
    quality = qualities[source] if source < len(qualities) else None
    out, pieces, owners = [], [], []
    for text, judged in items:
        nbytes = len(text.encode("utf-8", "replace"))
        verdict = h = sig = None
        if first_pass and judged:
            verdict = quality.evaluate(text) if quality is not None else None
            if verdict is None and dedup is not None:
                h = content_hash(text) if dedup.cfg.exact else None
                sig = dedup.signature(text) if dedup.cfg.near else None
        encode = verdict is None and bool(text.strip()) and nontext_reason(text) is None
        if encode:
            parts = list(text_pieces(text, MAX_DOCUMENT_BYTES)) if len(text) > MAX_DOCUMENT_BYTES else [text]
            for part in parts:
                pieces.append(encodable_part(part)[0])
                owners.append(len(out))
        out.append(Prepared(verdict, nbytes, h, sig, [] if encode else None))
    bos = tok.bos_id
    for owner, ids in zip(owners, tok.encode_batch(pieces) if pieces else []):
        tokens = np.empty(len(ids) + 1, dtype=np.uint32)
        tokens[0] = bos
        tokens[1:] = ids
        out[owner].tokens.append(tokens)
    return out, own_peak_rss_mb()


# -------------------------------------------------------------------------- in the build itself
class PreparePool:
    """N spawned worker processes (spawn, not fork: the caller may hold torch's or the
    tokenizer's threads, which a forked child would inherit broken). A worker that dies (killed
    for memory, or a script calling the build without an `if __name__ == "__main__":` guard,
    which spawn re-imports) fails the build with a SpudError instead of hanging it."""

    def __init__(self, workers: int, tokenizer, sources: list):
        from spud.data.clean import QualityFilter  # noqa: PLC0415

        qualities, dedup = [], None
        for s in sources:
            q = s.cleaner.quality if s.cleaner is not None else None
            qualities.append(QualityFilter(q.rules) if q is not None else None)  # rules only, no counts
            dedup = dedup or (s.cleaner.dedup if s.cleaner is not None else None)
        shipped = None
        if dedup is not None:  # the settings, not the index: a worker only hashes
            from spud.data.dedup import Deduplicator  # noqa: PLC0415

            shipped = Deduplicator(dedup.cfg)
        self.workers = workers
        self.peak_rss_mb = 0.0  # the largest worker's, as last reported with a chunk
        self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                                         initargs=(tokenizer.backend.to_str(), qualities, shipped))

    def attach(self, sources: list) -> None:
        for k, s in enumerate(sources):
            s.prepare = self._reader(k, s)

    def _reader(self, k: int, source) -> Callable:
        def prepare(read, stats, first_pass: bool):
            return self.records(k, read, stats, first_pass,
                                lambda: source.budget() if getattr(source, "budget", None) else None)
        return prepare

    def records(self, source: int, read: Callable, stats, first_pass: bool,
                budget: Callable = lambda: None) -> Iterator[tuple]:
        """(text, progress, where, Prepared) for every record of `read(stats)`, in order, with
        the reader's counting applied to `stats` as each record is reached. `budget()` → a
        callable giving the tokens the mix still wants from this source (or None): reading ahead
        stops at about that many bytes, so a source cut at its budget is not read far past it."""
        from spud.data.part import _RecordingStats  # noqa: PLC0415

        events: list = []
        it = read(_RecordingStats(events))
        pending: deque = deque()
        last_where = [None]
        seen = [0, 0]  # characters and tokens of what the workers encoded: bytes per token

        def ahead() -> float:
            """Characters worth submitting now (inf: no budget, just the in-flight cap)."""
            left = budget()
            if left is None:
                return float("inf")
            per_token = seen[0] / seen[1] if seen[1] else 1.5  # low first guess: digits are ~1.5
            return left * per_token * 1.1 - sum(c[2] for c in pending)

        def submit(limit: float) -> bool:
            chunk, size = [], 0
            limit = min(max(limit / self.workers, MIN_CHUNK_BYTES), CHUNK_BYTES)
            for text, progress, where in it:
                judged = where != last_where[0]
                last_where[0] = where
                chunk.append((text, progress, where, list(events), judged))
                events.clear()
                size += len(text)
                if size >= limit or len(chunk) >= CHUNK_RECORDS:
                    break
            if not chunk:
                return False
            job = self._pool.submit(_prepare_chunk, source, first_pass, [(c[0], c[4]) for c in chunk])
            pending.append((chunk, job, size))
            return True

        try:
            more = True
            while True:
                try:  # a dead worker breaks the pool: submit or result raises
                    while more and len(pending) < IN_FLIGHT_PER_WORKER * self.workers:
                        want = ahead()
                        if pending and want <= 0:
                            break
                        more = submit(want)
                    if not pending:
                        break
                    chunk, job, _ = pending.popleft()
                    results, peak = self._result(job)
                    self.peak_rss_mb = max(self.peak_rss_mb, peak)
                except BrokenProcessPool:
                    raise SpudError(
                        "data build: a worker process died (out of memory? or a script that calls the "
                        "build without an `if __name__ == \"__main__\":` guard, which worker processes "
                        "re-import); set data.workers=1 (--workers 1) to build in one process") from None
                for (text, progress, where, evs, _), prep in zip(chunk, results):
                    if prep.tokens:
                        seen[0] += len(text)
                        seen[1] += sum(len(t) for t in prep.tokens)
                    replay_stats(evs, stats)
                    yield text, progress, where, prep
            replay_stats(events, stats)  # counted after the last record (e.g. trailing blank lines)
        finally:
            # Chunks still in flight (a source cut at its budget) are left to finish, not
            # cancelled: CPython 3.11's executor, if it later finds a worker dead (terminate()),
            # fails on a cancelled future in its manager thread and leaves the call queue's
            # feeder thread for the interpreter to join at exit, for ever. At most
            # IN_FLIGHT_PER_WORKER chunks per worker are wasted.
            it.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # reaped: their peak RSS is now in RUSAGE_CHILDREN

    def _workers(self) -> list:
        return list((getattr(self._pool, "_processes", None) or {}).values())

    def _result(self, job):
        """job.result(), but a dead worker fails it even when the executor would wait forever:
        CPython 3.11's pool can deadlock when a worker dies while the feeder thread is writing
        the call queue (seen in this suite: the test killing a worker hung instead of raising).
        Workers never exit on their own while the pool lives, so any exit code means death."""
        while True:
            try:
                return job.result(timeout=WORKER_POLL_S)
            except FutureTimeout:
                if any(p.exitcode is not None for p in self._workers()):
                    raise BrokenProcessPool("a worker process exited") from None

    def terminate(self) -> None:
        """Stop after an error: kill the workers, then make sure the executor's manager thread
        ends, because the interpreter joins that thread at exit: a thread stuck there hangs the
        process after the build has already failed (tests/data/dead_worker_scenario.py).

        A worker killed in the middle of sending its result leaves part of a message in the
        result pipe; the manager thread then blocks in `recv` for the rest, for ever, since this
        process holds the pipe's write end too. Closing that write end once every worker is dead
        turns the wait into EOF: the manager marks the pool broken and exits."""
        pool = self._pool
        manager, calls, results = pool._executor_manager_thread, pool._call_queue, pool._result_queue
        for p in self._workers():
            p.kill()
        for p in self._workers():
            p.join(MANAGER_EXIT_S)
        # No cancel_futures: a cancelled future makes the manager thread's own clean-up raise.
        pool.shutdown(wait=False)
        if calls is not None:  # its feeder thread may be blocked writing to a dead worker
            calls.cancel_join_thread()
        if results is not None:
            results._writer.close()
        if manager is not None:
            manager.join(MANAGER_EXIT_S)


def replay_stats(events: list, stats) -> None:
    """Apply _RecordingStats events (deltas, skips, files) to a SourceStats."""
    for ev in events:
        if ev[0] == "s":
            setattr(stats, ev[1], getattr(stats, ev[1]) + ev[2])
        elif ev[0] == "k":
            stats.skip(ev[1], ev[2], ev[3], ev[4])
        elif ev[0] == "f":
            stats.file_read(ev[1])
