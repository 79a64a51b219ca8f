"""llama.cpp as a batch-1 decode peer of the serving benchmark, on the same weights.

The spud model under test is written out as a one-checkpoint run directory, exported with
`spud export gguf` (the exporter users run, f32 by default so the weights are bit-identical), and
loaded by llama.cpp through llama-cpp-python. `LlamaCppPeer.run(prompt, n)` then generates n
greedy tokens from the same prompt ids and returns when each arrived, like the other contenders
of benchmarks/serve_throughput.py.

llama-cpp-python is optional (it compiles llama.cpp when pip installs it:
`pip install llama-cpp-python`); `missing()` says why the peer cannot run instead of raising, so
the benchmark reports it as absent rather than failing.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def missing() -> str | None:
    """Why the peer cannot run here (a sentence), or None when it can."""
    absent = [pip for mod, pip in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))
              if importlib.util.find_spec(mod) is None]
    if absent:
        return (f"{' and '.join(absent)} not installed (pip install {' '.join(absent)}): "
                "llama.cpp peer skipped")
    return None


def write_run(model: torch.nn.Module, cfg, tok, run: Path) -> Path:
    """RUN holding the model under test as `spud import hf` would write it (one weights-only
    checkpoint, tokenizer, config): the directory `spud export gguf` reads."""
    from spud.config import validate_config
    from spud.export.source import write_weights_run

    run.mkdir(parents=True, exist_ok=True)
    full = validate_config({"model": cfg.model_dump(mode="json")}, "serve_throughput model")
    write_weights_run(run, model, full, tok)
    return run


class LlamaCppPeer:
    """One llama.cpp context over the exported GGUF, threads pinned to the benchmark's."""

    def __init__(self, gguf_path: Path, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.path = gguf_path
        self.llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=min(512, n_ctx),
                         n_threads=threads, n_threads_batch=threads, logits_all=False,
                         verbose=False)

    @classmethod
    def build(cls, model, cfg, tok, workdir: Path, threads: int, outtype: str = "f32") -> "LlamaCppPeer":
        from spud.export.gguf import export_gguf

        run = write_run(model, cfg, tok, workdir / "peer-run")
        path = workdir / f"peer-{outtype}.gguf"
        export_gguf(run, path, which="base", outtype=outtype, force=True)
        return cls(path, cfg.max_seq_len, threads)

    def run(self, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
        """Token arrival times (relative to the call) and ids of n greedy tokens. llama-cpp-
        python's generate() yields a token before evaluating it, so the gap between two yields
        is one decode step plus its sampling, as for the other contenders. End tokens are not
        special here (no stop), like the engine's ignore_eos."""
        t0 = time.perf_counter()
        times, ids = [], []
        for t in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                   repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - t0)
            ids.append(int(t))
            if len(ids) == n:
                break
        return times, ids

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()
