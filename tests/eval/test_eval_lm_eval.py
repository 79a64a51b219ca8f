"""lm-evaluation-harness adapter: a local multiple-choice task (a JSONL file and a task YAML in
tmp_path, no network) through `simple_evaluate(model="spud")`, checked against spud's own scorer,
and against lm-eval's `local-completions` model talking to a live `spud serve` app."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

# lm-eval must never reach the network; datasets reads these when it is first imported.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

OVERRIDES = [
    "data.total_tokens=40000", "tokenizer.vocab_size=400", "tokenizer.train_bytes=150000",
    "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=1",
    "train.micro_batch_size=4", "train.sample_prompts=[]", "model.max_seq_len=64",
]
TASK = "spud_local_mc"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from rich.console import Console

    from spud.config import load_config
    from spud.train.trainer import Trainer

    cfg = load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml", OVERRIDES)
    run = tmp_path_factory.mktemp("lmeval") / "run"
    Trainer(cfg, run, console=Console(quiet=True)).run()
    return run


def write_task(dirpath: Path, n: int = 12, name: str = TASK) -> Path:
    """Addition questions with four numeric choices, and an lm-eval task YAML reading them."""
    rng = random.Random(0)
    data = dirpath / "mc.jsonl"
    with data.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 30), rng.randint(1, 30)
            opts = [a + b, a + b + 1, a + b - 1, a + b + 10]
            rng.shuffle(opts)
            f.write(json.dumps({"question": f"{a} + {b} =", "choices": [str(o) for o in opts],
                                "label": opts.index(a + b)}) + "\n")
    (dirpath / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return data


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lmeval_tasks")
    write_task(d)
    os.environ["HF_DATASETS_CACHE"] = str(d / "hf_cache")
    return d


def evaluate(task_dir: Path, model: str, model_args, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    import spud.eval.lm_eval_adapter  # noqa: F401  registers "spud"

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], task_manager=tm,
                                   log_samples=True, **kw)


def resps(res: dict) -> list[list[float]]:
    """Per document, the log-likelihood of each choice."""
    docs = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in docs]


@pytest.fixture(scope="module")
def native(run_dir, task_dir) -> dict:
    return evaluate(task_dir, "spud", f"run={run_dir},device=cpu,batch_size=8")


def test_native_adapter_runs_the_local_task(native):
    r = native["results"][TASK]
    assert 0.0 <= r["acc,none"] <= 1.0
    assert len(native["samples"][TASK]) == 12
    for row in resps(native):
        assert len(row) == 4 and all(math.isfinite(v) and v < 0 for v in row)


def test_adapter_scores_equal_spud_scorer(native, run_dir, task_dir):
    """lm-eval's log-likelihoods are spud's own: BOS + question, each choice summed."""
    from spud.eval.scoring import choice_logprobs
    from spud.runs import load_model

    model, tok, _, _ = load_model(run_dir, None, "cpu")
    docs = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    for doc, got in zip(docs, resps(native)):
        ctx = tok.encode(doc["question"], add_bos=True)
        # lm-eval joins context and choice with its target_delimiter " " and tokenizes the whole
        want = choice_logprobs(model, ctx, [tok.encode(doc["question"] + " " + c)[len(ctx) - 1:]
                                            for c in doc["choices"]], tok.pad_id)
        assert got == pytest.approx(want, abs=1e-4)


def test_adapter_greedy_flag_batching_and_rolling(run_dir):
    import torch

    from spud.eval.lm_eval_adapter import SpudLM

    one = SpudLM(run=str(run_dir), device="cpu", batch_size=1)
    many = SpudLM(model=one._model, tokenizer=one._tok, batch_size=7)
    tok = one._tok
    ctx = tok.encode("1 + 1 =", add_bos=True)
    # the model's own greedy continuation must come back as is_greedy=True
    seq, greedy = list(ctx), []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(one._model(torch.tensor([seq]))[0, -1].argmax())
            greedy.append(nxt)
            seq.append(nxt)
    (lp, is_greedy), = one.score_pairs([(ctx, greedy)])
    assert is_greedy and lp < 0
    (_, not_greedy), = one.score_pairs([(ctx, [(greedy[0] + 1) % tok.vocab_size] + greedy[1:])])
    assert not not_greedy
    # batch size and request order do not change the scores (padding is never attended)
    pairs = [(ctx, tok.encode(f" {i * 37}")) for i in range(11)] + [(ctx, tok.encode(" x" * 80))]
    a, b = one.score_pairs(pairs), many.score_pairs(pairs)
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)

    class Req:
        def __init__(self, *args):
            self.args = args

    text = "def add(a, b):\n    return a + b\n" * 12  # several windows of 64 tokens
    ids = tok.encode(text)
    assert len(ids) > 2 * one.max_length
    (rolling,) = one.loglikelihood_rolling([Req(text)])
    # windows: the first conditioned on BOS; the sum must equal a token-by-token computation
    assert math.isfinite(rolling) and rolling < 0
    short = "x = 1\n"
    (r_short,) = one.loglikelihood_rolling([Req(short)])
    (ll_short, _), = one.score_pairs([([tok.bos_id], tok.encode(short))])
    assert r_short == pytest.approx(ll_short, abs=1e-5)

    outs = one.generate_until([Req("1 + 1 =", {"until": ["\n"], "max_gen_toks": 8}),
                               Req("1 + 1 =", {"until": ["\n"], "max_gen_toks": 8, "do_sample": True,
                                               "temperature": 0.8})])
    assert all(isinstance(o, str) and "\n" not in o for o in outs)
    assert len(tok.encode(outs[0])) <= 8


def test_generate_until_through_lm_eval(run_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    import spud.eval.lm_eval_adapter  # noqa: F401

    data = tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i} + 1 =", "a": str(i + 1)}) + "\n" for i in range(3)))
    (tmp_path / "gen.yaml").write_text(f"""\
task: spud_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path / "hf_cache")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    res = lm_eval.simple_evaluate(model="spud", model_args=f"run={run_dir},device=cpu",
                                  tasks=["spud_local_gen"], task_manager=tm)
    assert 0.0 <= res["results"]["spud_local_gen"]["exact_match,none"] <= 1.0


def test_model_args_errors():
    from spud.errors import SpudError
    from spud.eval.lm_eval_adapter import SpudLM

    with pytest.raises(SpudError, match="run="):
        SpudLM.create_from_arg_string("device=cpu")


# --------------------------------------------------------------- lm-eval against `spud serve`
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(run_dir):
    from spud.serve.engine import Engine
    from spud.serve.server import build_server

    engine = Engine.from_run(run_dir, device="cpu", max_batch=8, max_queue=64)
    engine.start()
    port = _free_port()
    server = build_server(engine, "127.0.0.1", port, None, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine.model_name
    server.should_exit = True
    thread.join(timeout=15)


def test_local_completions_against_spud_serve_matches_native(native, server_url, run_dir, task_dir):
    pytest.importorskip("transformers")
    pytest.importorskip("tenacity")  # lm-eval[api]: what its API models need
    url, name = server_url
    args = (f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={run_dir},tokenized_requests=False,max_length=64,num_concurrent=1,"
            f"max_retries=1,timeout=60")
    served = evaluate(task_dir, "local-completions", args)
    assert served["results"][TASK]["acc,none"] == native["results"][TASK]["acc,none"]
    for a, b in zip(resps(served), resps(native)):
        assert a == pytest.approx(b, abs=1e-3)


def test_cli_main_runs_lm_eval_command_line(run_dir, task_dir, capsys):
    """What `spud lm-eval ...` and `python -m spud.eval.lm_eval_adapter ...` run; lm-eval's CLI
    also passes its default --device cuda:0 and --batch_size 1, which must not clash."""
    from spud.eval.lm_eval_adapter import cli_main

    cli_main(["--model", "spud", "--model_args", f"run={run_dir},device=cpu,batch_size=4",
              "--tasks", TASK, "--include_path", str(task_dir), "--limit", "3"])
    out = capsys.readouterr().out
    assert TASK in out and "acc" in out


def test_model_args_win_over_lm_eval_defaults(run_dir):
    import torch

    from spud.eval.lm_eval_adapter import SpudLM

    lm = SpudLM.create_from_arg_string(f"run={run_dir},device=cpu,batch_size=3",
                                       {"device": "cuda:0", "batch_size": 1, "max_batch_size": None})
    assert lm.batch_size == 3 and lm.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            lm = SpudLM.create_from_arg_string(f"run={run_dir}", {"device": "cuda:0", "batch_size": "2"})
        assert lm.batch_size == 2 and lm.device.type == "cpu"
