"""Serving throughput: spud's engine vs Hugging Face generate() at batch 1, then HTTP load.

Part 1, batch-1 decode. A random-init spud model of a preset (the default recipe) and its
transformers twin holding the *identical* weights (spud.export.peer.hf_twin: the class `spud
export hf` writes, e.g. Qwen3ForCausalLM for the default QK-norm recipe) each
generate the same number of greedy tokens from the same prompt, with the same torch thread
count, in one process. Three contenders, alternating order round by round (a shared, noisy
machine then hits all of them alike); the median round is reported:
- spud_engine: Engine.submit() on a running engine (continuous-batching path, one request),
  its decode steps through the CPU decode kernel (spud.serve.decode_kernel) where it applies;
- spud_engine_module: the same engine with decode_kernel=False (the model's own forward), so the
  kernel's gain is measured side by side;
- spud_generate: spud.serve.sampling.generate (the plain KV-cache loop, for reference);
- hf_generate: the twin's generate(do_sample=False, use_cache=True, min_new_tokens=N);
- llama_cpp (when llama-cpp-python is installed; --llama-cpp off leaves it out): the same model
  exported with `spud export gguf` (f32 by default: the same weights bit for bit) and run by
  llama.cpp, greedy, the same thread count (benchmarks/llama_cpp_peer.py).
Time to first token (prefill + first sample) is measured apart from the decode rate, which is
(N - 1) tokens / (time of token N - time of token 1).

Part 1b, the engine alone: at each concurrency level C, C greedy requests submitted together
straight to the engine (no HTTP); aggregate tokens/s from submit to the last finish, levels
alternating round by round, median. Its 16-vs-1 ratio is the engine's own scaling; the HTTP
one below also carries the per-token cost of the server's event loop and of the load clients,
which share this process (and its GIL) with the server.

Part 2, HTTP load on loopback. The same engine behind the real server (uvicorn in a thread on
127.0.0.1, a free port). At each concurrency level C, C asyncio clients (httpx, in this process)
each send --requests-per-client streaming /v1/completions requests one after another; reported:
aggregate completion tokens/s over the level's wall time, TTFT and end-to-end latency p50/p99.
End tokens get logit_bias -100 so every request generates exactly --max-tokens tokens.

    python benchmarks/serve_throughput.py --preset micro --max-tokens 128 --concurrency 1 4 16 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from spud.config import ModelConfig, TokenizerConfig
from spud.model.registry import build_model
from spud.export.peer import hf_twin
from spud.hardware import cpu_name
from spud.serve.engine import Engine, SamplingParams, TokenEvent
from spud.serve.sampling import generate
from spud.tokenizer import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # llama_cpp_peer, prefill_stall, speculation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="micro", help="a model preset (with the default recipe; any `spud export hf`-expressible one)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=128, help="generated tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="timed batch-1 rounds per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed batch-1 rounds first")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--level-timeout", type=float, default=180.0,
                   help="seconds allowed per concurrency level; unfinished requests are cancelled")
    p.add_argument("--max-batch", type=int, default=0, help="engine slots; 0 = max(64, concurrency)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--llama-cpp", choices=["auto", "off"], default="auto",
                   help="auto: add llama.cpp (llama-cpp-python) as a batch-1 peer when installed")
    p.add_argument("--llama-cpp-outtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="GGUF tensor type for the llama.cpp peer (f32 = the same weights)")
    p.add_argument("--out", default="benchmarks/results/serve_throughput.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke-test sizes: nano preset, 8 tokens, 1 round, concurrency 1 2")
    p.add_argument("--prefill-stall", action="store_true",
                   help="only the chunked-vs-whole prefill benchmark (benchmarks/prefill_stall.py, "
                        "whose own options follow --prefill-stall)")
    p.add_argument("--speculation", action="store_true",
                   help="only speculative decoding on vs off (benchmarks/speculation.py RUN "
                        "[--draft RUN2], whose own arguments follow --speculation)")
    if argv is None:
        argv = sys.argv[1:]
    if "--speculation" in argv:  # the rest of the command line belongs to speculation.py
        at = argv.index("--speculation")
        args = p.parse_args(argv[:at + 1])
        args.speculation_argv = argv[at + 1:]
        return args
    if "--prefill-stall" in argv:  # the rest of the command line belongs to prefill_stall
        at = argv.index("--prefill-stall")
        args = p.parse_args(argv[:at + 1])
        args.prefill_stall_argv = argv[at + 1:]
        return args
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        # --quick only shrinks what was not given explicitly.
        for flag, attr, val in [("--preset", "preset", "nano"), ("--max-tokens", "max_tokens", 8),
                                ("--prompt-tokens", "prompt_tokens", 8), ("--rounds", "rounds", 1),
                                ("--warmup", "warmup", 1), ("--concurrency", "concurrency", [1, 2]),
                                ("--requests-per-client", "requests_per_client", 1),
                                ("--level-timeout", "level_timeout", 30.0)]:
            if flag not in given:
                setattr(args, attr, val)
    if args.max_tokens < 2:
        p.error("--max-tokens must be >= 2 (decode rate needs a second token)")
    if args.prompt_tokens < 1 or args.rounds < 1 or min(args.concurrency) < 1:
        p.error("--prompt-tokens, --rounds and every --concurrency must be >= 1")
    return args


# ------------------------------------------------------------------------------------ setup
def make_tokenizer(vocab: int, seed: int):
    """A byte-level BPE trained in a fraction of a second on synthetic words; the model's
    vocabulary matches it, so every id the random model emits decodes to some text."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "po", "ze",
           "an", "el", "or", "us"]

    def word() -> str:
        return "".join(rng.choice(syl) for _ in range(rng.randint(1, 4)))

    texts = [" ".join(word() for _ in range(200)) for _ in range(300)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=vocab, min_frequency=1))


def make_models(args: argparse.Namespace, tok):
    cfg = ModelConfig(preset=args.preset, vocab_size=tok.vocab_size)
    need = args.prompt_tokens + args.max_tokens
    if need > cfg.max_seq_len:
        cfg = ModelConfig(preset=args.preset, vocab_size=tok.vocab_size, max_seq_len=need)
    torch.manual_seed(args.seed)
    spud = build_model(cfg).eval()
    peer = hf_twin(spud, attn_implementation="sdpa", use_cache=True)
    x = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens))
    with torch.no_grad():  # identical weights ⇒ identical function; check before timing
        max_diff = (spud(x) - peer(input_ids=x).logits).abs().max().item()
    return cfg, spud, peer, max_diff


def make_prompt(tok, n: int, seed: int) -> list[int]:
    """n ordinary (non-special) token ids, starting with BOS as the API would send them."""
    rng = random.Random(seed + 1)
    return [tok.bos_id] + [rng.randrange(len(tok.special_ids), tok.vocab_size)
                           for _ in range(n - 1)]


# ------------------------------------------------------------------------- batch-1 decode
def run_engine(engine: Engine, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
    """Token arrival times (relative to submit) and ids of one greedy request."""
    t0 = time.perf_counter()
    h = engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    times, ids = [], []
    for ev in h:
        if isinstance(ev, TokenEvent):
            times.append(time.perf_counter() - t0)
            ids.append(ev.token_id)
    return times, ids


def run_spud_generate(model, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
    t0 = time.perf_counter()
    times, ids = [], []
    for tok in generate(model, prompt, n, temperature=0.0):
        times.append(time.perf_counter() - t0)
        ids.append(tok)
    return times, ids


class _TimingStreamer:
    """transformers streamer recording when each generated token is handed out (the first
    put() is the prompt itself)."""

    def __init__(self, t0: float):
        self.t0, self.times, self.ids, self._prompt_seen = t0, [], [], False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.t0)
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def run_hf(peer, prompt: list[int], n: int) -> tuple[list[float], list[int]]:
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    st = _TimingStreamer(t0)
    with torch.inference_mode():
        peer.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, use_cache=True, streamer=st,
                      pad_token_id=0, eos_token_id=None)
    return st.times, st.ids


def summarize_rounds(rounds: list[tuple[list[float], list[int]]], n: int) -> dict:
    ttft = [ts[0] for ts, _ in rounds]
    rates = [(len(ts) - 1) / (ts[-1] - ts[0]) for ts, _ in rounds]
    counts = [len(ts) for ts, _ in rounds]
    return {"decode_tokens_per_s": statistics.median(rates), "decode_tokens_per_s_rounds": rates,
            "ttft_s": statistics.median(ttft), "ttft_s_rounds": ttft,
            "tokens_generated": counts, "all_rounds_full": all(c == n for c in counts)}


def bench_batch1(args, engine: Engine, engine_module: Engine, spud, peer, prompt: list[int],
                 llama=None) -> dict:
    n = args.max_tokens
    runs = {
        "spud_engine": lambda: run_engine(engine, prompt, n),
        "spud_engine_module": lambda: run_engine(engine_module, prompt, n),
        "spud_generate": lambda: run_spud_generate(spud, prompt, n),
        "hf_generate": lambda: run_hf(peer, prompt, n),
    }
    if llama is not None:
        runs["llama_cpp"] = lambda: llama.run(prompt, n)
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    out: dict[str, list] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate who goes first
        if r % 2:
            order = order[::-1]
        for k in order:
            out[k].append(runs[k]())
    res = {k: summarize_rounds(v, n) for k, v in out.items()}
    first = {k: v[0][1] for k, v in out.items()}
    res["greedy_tokens_match_hf"] = first["spud_engine"] == first["hf_generate"]
    res["engine_matches_generate"] = first["spud_engine"] == first["spud_generate"]
    res["kernel_matches_module"] = first["spud_engine"] == first["spud_engine_module"]
    res["decode_kernel"] = engine._kernel is not None
    res["kernel_vs_module"] = (res["spud_engine"]["decode_tokens_per_s"]
                               / res["spud_engine_module"]["decode_tokens_per_s"])
    res["engine_vs_hf"] = (res["spud_engine"]["decode_tokens_per_s"]
                           / res["hf_generate"]["decode_tokens_per_s"])
    res["generate_vs_hf"] = (res["spud_generate"]["decode_tokens_per_s"]
                             / res["hf_generate"]["decode_tokens_per_s"])
    if llama is not None:
        res["llama_cpp_matches_engine"] = first["llama_cpp"] == first["spud_engine"]
        res["engine_vs_llama_cpp"] = (res["spud_engine"]["decode_tokens_per_s"]
                                      / res["llama_cpp"]["decode_tokens_per_s"])
        res["llama_cpp_vs_hf"] = (res["llama_cpp"]["decode_tokens_per_s"]
                                  / res["hf_generate"]["decode_tokens_per_s"])
    return res


# --------------------------------------------------------------------- engine streams
def run_streams(engine: Engine, prompt: list[int], n: int, c: int) -> float:
    """Aggregate tokens/s of c greedy requests submitted together straight to the engine
    (no HTTP): c·n tokens over the time from submit until the last one finished."""
    t0 = time.perf_counter()
    hs = [engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
          for _ in range(c)]
    tokens = sum(len(h.result()[1]) for h in hs)
    return tokens / (time.perf_counter() - t0)


def bench_engine_streams(args, engine: Engine, prompt: list[int]) -> list[dict]:
    """The engine's own scaling with concurrent streams, apart from the HTTP layer (whose
    per-token cost is paid on one event loop, shared with the load clients in this process):
    levels alternate round by round, median reported."""
    levels = sorted(set(args.concurrency))
    rates: dict[int, list[float]] = {c: [] for c in levels}
    run_streams(engine, prompt, args.max_tokens, max(levels))  # warm-up
    for r in range(args.rounds):
        for c in (levels if r % 2 == 0 else levels[::-1]):
            rates[c].append(run_streams(engine, prompt, args.max_tokens, c))
    return [{"concurrency": c, "aggregate_tokens_per_s": statistics.median(v),
             "aggregate_tokens_per_s_rounds": v} for c, v in rates.items()]


# ----------------------------------------------------------------------------- HTTP load
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _LiveServer:
    def __init__(self, engine: Engine):
        from spud.serve.server import build_server

        self.port = _free_port()
        self.server = build_server(engine, "127.0.0.1", self.port, log_level="warning")
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("benchmark server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True  # uvicorn's shutdown also shuts the engine down
        self.thread.join(timeout=30)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _one_request(client, body: dict) -> tuple[float | None, float, int]:
    """→ (ttft, end-to-end latency, completion tokens) of one streaming completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - t0, tokens


async def _load_level(url: str, body: dict, clients: int, per_client: int, timeout: float) -> dict:
    import httpx

    ttfts: list[float] = []
    lats: list[float] = []
    tokens = [0]
    errors: list[str] = []

    async def client_task(client):
        for _ in range(per_client):
            try:
                ttft, lat, n = await _one_request(client, body)
            except Exception as e:  # noqa: BLE001 - count it, keep loading
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if ttft is not None:
                ttfts.append(ttft)
            lats.append(lat)
            tokens[0] += n

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_task(client)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    return {
        "concurrency": clients, "requests_per_client": per_client,
        "requests_completed": len(lats), "requests_failed": len(errors),
        "errors": errors[:5], "timed_out": bool(pending), "wall_s": wall,
        "completion_tokens": tokens[0],
        "aggregate_tokens_per_s": tokens[0] / wall if wall > 0 else 0.0,
        "ttft_p50_s": _pct(ttfts, 50), "ttft_p99_s": _pct(ttfts, 99),
        "latency_p50_s": _pct(lats, 50), "latency_p99_s": _pct(lats, 99),
    }


def bench_http(args, engine: Engine, tok, prompt: list[int]) -> list[dict]:
    ends = sorted(i for i in (tok.bos_id, tok.eos_id, tok.end_id) if i is not None)
    body = {
        "model": engine.model_name, "prompt": prompt, "max_tokens": args.max_tokens,
        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
        # a random model may pick an end token at any step: forbid them so every request
        # does the same amount of work
        "logit_bias": {str(i): -100 for i in ends},
    }
    srv = _LiveServer(engine)
    try:
        # one untimed request: connection setup, first-call costs of the app
        asyncio.run(_load_level(srv.url, {**body, "max_tokens": 2}, 1, 1, args.level_timeout))
        return [asyncio.run(_load_level(srv.url, body, c, args.requests_per_client,
                                        args.level_timeout)) for c in args.concurrency]
    finally:
        srv.stop()


# --------------------------------------------------------------------------------- report
def _fmt(x: float | None, unit: str = "ms") -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:,.1f}" if unit == "ms" else f"{x:,.1f}"


def print_tables(res: dict, header: str) -> None:
    b1 = res["batch1"]
    t1 = (["contender", "decode tok/s", "TTFT ms", "vs HF"],
          [[k, f"{b1[k]['decode_tokens_per_s']:,.1f}", _fmt(b1[k]["ttft_s"]),
            f"{b1[k]['decode_tokens_per_s'] / b1['hf_generate']['decode_tokens_per_s']:.2f}x"]
           for k in ("spud_engine", "spud_engine_module", "spud_generate", "hf_generate", "llama_cpp")
           if k in b1])
    base = res["http"][0]["aggregate_tokens_per_s"] if res["http"] else 0.0
    e1 = res["engine_streams"][0]["aggregate_tokens_per_s"] if res["engine_streams"] else 0.0
    t3 = (["streams", "tok/s", "x 1 stream"],
          [[str(e["concurrency"]), f"{e['aggregate_tokens_per_s']:,.1f}",
            f"{e['aggregate_tokens_per_s'] / e1:.2f}x" if e1 else "-"] for e in res["engine_streams"]])
    t2 = (["clients", "reqs", "tok/s", "x c=1", "TTFT p50", "TTFT p99", "e2e p50", "e2e p99"],
          [[str(h["concurrency"]), f"{h['requests_completed']}/{h['concurrency'] * h['requests_per_client']}",
            f"{h['aggregate_tokens_per_s']:,.1f}",
            f"{h['aggregate_tokens_per_s'] / base:.2f}x" if base else "-",
            _fmt(h["ttft_p50_s"]), _fmt(h["ttft_p99_s"]), _fmt(h["latency_p50_s"]),
            _fmt(h["latency_p99_s"])] for h in res["http"]])
    titles = [header + " — batch-1 greedy decode (median)",
              "engine alone: concurrent greedy streams, aggregate (median)",
              "HTTP streaming /v1/completions on loopback (latencies in ms)"]
    try:
        from rich.console import Console
        from rich.table import Table

        con = Console()
        for title, (cols, rows) in zip(titles, (t1, t3, t2)):
            table = Table(title=title)
            for i, c in enumerate(cols):
                table.add_column(c, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            con.print(table)
    except ImportError:
        for title, (cols, rows) in zip(titles, (t1, t3, t2)):
            print(title)
            widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
            for line in [cols, *rows]:
                print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    for line in res["targets"]["lines"]:
        print(line)


def llama_cpp_version_or_none(args) -> str | None:
    if args.llama_cpp == "off":
        return None
    from llama_cpp_peer import llama_cpp_version

    return llama_cpp_version()


def _loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return [float("nan")] * 3


def targets(res: dict) -> dict:
    b1 = res["batch1"]
    ratio = b1["engine_vs_hf"]
    by_c = {h["concurrency"]: h["aggregate_tokens_per_s"] for h in res["http"]}
    out = {"batch1_vs_hf": ratio, "batch1_vs_hf_target": 3.0, "lines": []}
    out["lines"].append(f"target batch-1 engine ≥ 3× HF: {ratio:.2f}× "
                        f"({'met' if ratio >= 3 else 'NOT met'})")
    if "engine_vs_llama_cpp" in b1:
        out["batch1_vs_llama_cpp"] = b1["engine_vs_llama_cpp"]
        out["lines"].append(f"peer llama.cpp ({b1['llama_cpp_outtype']} GGUF): engine "
                            f"{b1['engine_vs_llama_cpp']:.2f}× llama.cpp at batch 1; greedy tokens "
                            f"{'equal' if b1['llama_cpp_matches_engine'] else 'DIFFER'}")
    # issue 14's target: 16 concurrent streams at >= 12x the single-stream rate
    if 16 in by_c and 1 in by_c and by_c[1] > 0:
        scale = by_c[16] / by_c[1]
        scale_engine = by_c[16] / b1["spud_engine"]["decode_tokens_per_s"]
        out.update({"agg16_vs_http_c1": scale, "agg16_vs_engine_batch1_decode": scale_engine,
                    "agg16_target": 12.0})
        out["lines"].append(
            f"target 16-stream aggregate ≥ 12× batch-1 (HTTP): {scale:.2f}× HTTP c=1, "
            f"{scale_engine:.2f}× engine batch-1 decode ({'met' if scale >= 12 else 'NOT met'})")
    by_e = {e["concurrency"]: e["aggregate_tokens_per_s"] for e in res["engine_streams"]}
    if 16 in by_e and 1 in by_e and by_e[1] > 0:
        scale = by_e[16] / by_e[1]
        out["agg16_vs_1_engine"] = scale
        out["lines"].append(f"target 16-stream aggregate ≥ 12× batch-1 (engine alone): {scale:.2f}× "
                            f"({'met' if scale >= 12 else 'NOT met'})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefill_stall:
        import prefill_stall

        prefill_stall.main(args.prefill_stall_argv)
        return 0
    if args.speculation:
        import speculation

        return speculation.main(args.speculation_argv)
    try:
        import httpx  # noqa: F401
        import transformers
    except ImportError:
        print("needs transformers and httpx: pip install 'spud[bench]'", file=sys.stderr)
        return 1
    prev_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, transformers)
    finally:
        torch.set_num_threads(prev_threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace, transformers) -> int:
    threads = torch.get_num_threads()
    load_before = _loadavg()
    if load_before[0] > 0.5:
        print(f"warning: 1-min load average is {load_before[0]:.2f} before starting; other "
              "processes on these cores will distort the numbers", file=sys.stderr)

    tok = make_tokenizer(args.vocab, args.seed)
    cfg, spud, peer, max_diff = make_models(args, tok)
    prompt = make_prompt(tok, args.prompt_tokens, args.seed)
    max_batch = args.max_batch or max(64, *args.concurrency)
    engine = Engine(spud, tok, max_batch=max_batch, max_queue=max(256, 2 * max_batch),
                    model_name=f"bench-{args.preset}")
    engine_module = Engine(spud, tok, max_batch=1, decode_kernel=False, model_name=f"bench-{args.preset}")
    llama, llama_note, workdir = None, None, tempfile.TemporaryDirectory()
    if args.llama_cpp == "auto":
        from llama_cpp_peer import LlamaCppPeer, missing

        llama_note = missing()
        if llama_note is not None:
            print(llama_note, file=sys.stderr)
        else:
            llama = LlamaCppPeer.build(spud, cfg, tok, Path(workdir.name), threads, args.llama_cpp_outtype)
    engine.start()
    engine_module.start()
    try:
        batch1 = bench_batch1(args, engine, engine_module, spud, peer, prompt, llama)
        if llama is not None:
            batch1["llama_cpp_outtype"] = args.llama_cpp_outtype
            llama.close()
        engine_module.shutdown()
        streams = bench_engine_streams(args, engine, prompt)
        load_mid = _loadavg()
        http = bench_http(args, engine, tok, prompt)  # stops the engine when done
    finally:
        engine.shutdown(abort=True)
        engine_module.shutdown(abort=True)
        workdir.cleanup()
    load_after = _loadavg()

    res = {"batch1": batch1, "engine_streams": streams, "http": http}
    res["targets"] = targets(res)
    header = (f"serve fp32 CPU ({cpu_name()}, {threads} threads) preset={args.preset} "
              f"prompt={args.prompt_tokens} new={args.max_tokens} load={load_before[0]:.2f}")
    print_tables(res, header)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": "serve_throughput",
        "device": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads,
        "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
        "llama_cpp_python": llama_cpp_version_or_none(args), "llama_cpp_note": llama_note,
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg": {"before": load_before, "after_batch1": load_mid, "after": load_after},
        "args": vars(args),
        "model": {"preset": args.preset, "config": cfg.model_dump(),
                  "params": sum(p.numel() for p in spud.parameters()),
                  "max_abs_logit_diff_vs_hf": max_diff},
        "engine": {"max_batch": max_batch},
        "batch1": batch1, "engine_streams": streams, "http": http, "targets": res["targets"],
    }
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
