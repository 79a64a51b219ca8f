"""lm-evaluation-harness adapter: a local multiple-choice task (a JSONL file and a task YAML in
tmp_path, no network) through `simple_evaluate(model="spud")`, checked against the model's own
forward pass summed by hand, against lm-eval's `local-completions` model talking to a live
`spud serve` app, and for which model (base or chat) it loads."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

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
SFT_OVERRIDES = ["sft.max_steps=2", "sft.checkpoint_every=2", "sft.eval_every=2", "sft.eval_batches=1",
                 "sft.micro_batch_size=4", "sft.builtin_conversations=120", "train.sample_tokens=4",
                 "train.threads=1", "sft.max_bad_fraction=0.5"]  # long built-in chats do not fit 64 tokens


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


@torch.no_grad()
def logprob_by_hand(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx): one unbatched forward pass, the continuation's log-softmax summed."""
    logp = torch.log_softmax(model(torch.tensor([ctx + cont]))[0].float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


@torch.no_grad()
def greedy_by_hand(model, tok, prompt: str, max_tokens: int, until: str) -> str:
    """Argmax decoding without a KV cache: full forward pass per token; stops at `until` (cut
    there), an end/eos/bos token or max_tokens."""
    seq, new = tok.encode(prompt, add_bos=True), []
    for _ in range(max_tokens):
        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
        if nxt in (tok.end_id, tok.eos_id, tok.bos_id):
            break
        seq.append(nxt)
        new.append(nxt)
        text = tok.decode(new)
        if until in text:
            return text[:text.index(until)]
    return tok.decode(new)


def resps(res: dict) -> list[list[float]]:
    """Per document, the log-likelihood of each choice."""
    docs = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in docs]


@pytest.fixture(scope="module")
def native(run_dir, task_dir) -> dict:
    return evaluate(task_dir, "spud", f"run={run_dir},device=cpu,batch_size=8")


def test_adapter_scores_and_accuracy_equal_the_forward_pass_by_hand(native, run_dir, task_dir):
    """Each log-likelihood lm-eval reports is the base model's own: BOS + question, then the
    choice's tokens summed from one forward pass; acc is the share of documents whose argmax
    choice is the label."""
    from spud.runs import load_model

    model, tok, _, ckpt = load_model(run_dir, None, "cpu", model="base")
    docs = [json.loads(line) for line in (task_dir / "mc.jsonl").read_text().splitlines()]
    assert len(native["samples"][TASK]) == len(docs) == 12
    correct = 0
    for doc, got in zip(docs, resps(native)):
        ctx = tok.encode(doc["question"], add_bos=True)
        # lm-eval joins context and choice with its target_delimiter " " and tokenizes the whole
        want = [logprob_by_hand(model, ctx, tok.encode(doc["question"] + " " + c)[len(ctx) - 1:])
                for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        correct += max(range(4), key=lambda i: want[i]) == doc["label"]
    assert native["results"][TASK]["acc,none"] == pytest.approx(correct / len(docs))
    # the results say which model they measure
    cfg = native["config"]
    assert cfg["spud_model"] == "base" and cfg["spud_checkpoint"] == str(ckpt) and cfg["spud_step"] == 3


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
    assert is_greedy and lp == pytest.approx(logprob_by_hand(one._model, ctx, greedy), abs=1e-4)
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
    # by hand: windows of L predicted tokens, the first conditioned on BOS, each later one on
    # the L tokens before its last target (lm-eval's disjoint rolling windows), one unbatched
    # forward pass per window
    L, want = one.max_length, 0.0
    for s in range(0, len(ids), L):
        e = min(s + L, len(ids))
        inp = [tok.bos_id] + ids[:e - 1] if s == 0 else ids[e - L - 1:e - 1]
        with torch.no_grad():
            logp = torch.log_softmax(one._model(torch.tensor([inp]))[0].float(), dim=-1)
        want += sum(float(logp[len(inp) - (e - s) + j, t]) for j, t in enumerate(ids[s:e]))
    assert len(range(0, len(ids), L)) >= 3
    assert rolling == pytest.approx(want, abs=1e-3)
    short = "x = 1\n"
    (r_short,) = one.loglikelihood_rolling([Req(short)])
    (ll_short, _), = one.score_pairs([([tok.bos_id], tok.encode(short))])
    assert r_short == pytest.approx(ll_short, abs=1e-5)

    def reqs():  # fresh each time: generate_until consumes the kwargs
        return [Req("1 + 1 =", {"until": ["\n"], "max_gen_toks": 8}),
                Req("1 + 1 =", {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 0.8})]

    outs = one.generate_until(reqs())
    assert outs[0] == greedy_by_hand(one._model, tok, "1 + 1 =", 8, "\n")
    assert "\n" not in outs[1]  # (its length is not checked by re-encoding: a sample may end mid-character)
    assert one.generate_until(reqs()) == outs  # request n samples with seed + n: reproducible


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
                                  tasks=["spud_local_gen"], task_manager=tm, log_samples=True)
    from spud.runs import load_model

    model, tok, _, _ = load_model(run_dir, None, "cpu", model="base")
    samples = sorted(res["samples"]["spud_local_gen"], key=lambda s: s["doc_id"])
    want = [greedy_by_hand(model, tok, f"{i} + 1 =", 6, "\n") for i in range(3)]
    assert [s["resps"][0][0] for s in samples] == want
    assert res["results"]["spud_local_gen"]["exact_match,none"] == pytest.approx(
        sum(w == str(i + 1) for i, w in enumerate(want)) / 3)


def test_model_args_errors(run_dir):
    from spud.errors import SpudError
    from spud.eval.lm_eval_adapter import SpudLM

    with pytest.raises(SpudError, match="run="):
        SpudLM.create_from_arg_string("device=cpu")
    with pytest.raises(SpudError, match="unknown model 'instruct': choose one of base, chat"):
        SpudLM.create_from_arg_string(f"run={run_dir},model=instruct")


def test_model_arg_chooses_base_or_chat(run_dir, task_dir, tmp_path, capsys):
    """model=chat loads the `spud sft` model in RUN/chat (and says so), model=base or nothing
    the pretrained one; their scores are each model's own."""
    import shutil

    from rich.console import Console

    from spud.eval.lm_eval_adapter import SpudLM
    from spud.posttrain.sft import sft_cmd
    from spud.runs import load_model

    run = tmp_path / "run"  # a private copy: the other tests keep a run without RUN/chat
    shutil.copytree(run_dir, run)
    sft_cmd(str(run), ["builtin"], None, SFT_OVERRIDES, resume=False, console=Console(quiet=True))
    capsys.readouterr()
    chat = SpudLM.create_from_arg_string(f"run={run},model=chat,device=cpu")
    assert f"chat model, checkpoint {run / 'chat' / 'checkpoints' / 'step_0000002'}" in capsys.readouterr().err
    base = SpudLM.create_from_arg_string(f"run={run},model=base,device=cpu")
    default = SpudLM.create_from_arg_string(f"run={run},device=cpu")
    assert (chat.model_kind, base.model_kind, default.model_kind) == ("chat", "base", "base")
    assert chat.checkpoint == str(run / "chat" / "checkpoints" / "step_0000002")
    assert base.checkpoint == default.checkpoint == str(run / "checkpoints" / "step_0000003")
    assert chat.get_model_info()["spud_model"] == "chat"
    ctx, cont = base._tok.encode("1 + 1 =", add_bos=True), base._tok.encode(" 2")
    for lm, which in ((chat, "chat"), (base, "base")):
        model = load_model(run, None, "cpu", model=which)[0]
        (got, _), = lm.score_pairs([(ctx, cont)])
        assert got == pytest.approx(logprob_by_hand(model, ctx, cont), abs=1e-5)
    assert chat.score_pairs([(ctx, cont)])[0][0] != pytest.approx(base.score_pairs([(ctx, cont)])[0][0], abs=1e-4)
    res = evaluate(task_dir, "spud", f"run={run},model=chat,device=cpu", limit=2)
    assert res["config"]["spud_model"] == "chat"


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
