"""Tool calls on /v1/chat/completions: the chat template's tool turns, parsed `tool_calls`
(whole and streamed), forced calls through the grammar, and a full call → result → answer round
trip with the official openai client. The model has random weights (see test_structured.py): a
forced call must still parse and match the function's parameters."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.conftest import LiveServer
from tests.serve.test_structured import random_engine

pytest.importorskip("llguidance")

ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two small integers.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                   "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                  "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                                      "properties": {"city": {"enum": ["Paris", "Oslo"]}}}}}
ASK = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tserver(serve_run):
    srv = LiveServer(random_engine(serve_run, max_batch=8, max_queue=32))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tclient(tserver):
    import openai

    return openai.OpenAI(base_url=tserver.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_template_without_tools_is_unchanged(serve_run):
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(serve_run / "tokenizer.json")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    ids, mask = tok.render_chat(msgs, True)
    assert tok.decode(ids) == "<|bos|><|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|assistant|>"
    assert (ids, mask) == tok.render_chat(msgs, True, tools=None) == tok.render_chat(msgs, True, tools=[])


def test_template_tool_turns(serve_run):
    from spud.tokenizer import Tokenizer

    tok = Tokenizer.load(serve_run / "tokenizer.json")
    msgs = [{"role": "system", "content": "Be brief."}, *ASK,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    ids, mask = tok.render_chat(msgs, True, tools=[ADD["function"]])
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|system|>Be brief.\n\nYou can call these tools.")
    assert json.dumps(ADD["function"]) + "\n</tools><|end|><|user|>What is 2 + 3?<|end|>" in text
    assert text.endswith('<|assistant|><tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|end|>'
                         "<|user|><tool_response>5</tool_response><|end|><|assistant|>")
    # SFT trains on the call (assistant turn) but not on the tool's result
    call = tok.encode('<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>') + [tok.end_id]
    start = len(ids) - 1 - len(tok.encode("<tool_response>5</tool_response>")) - 2 - len(call)
    assert ids[start:start + len(call)] == call and all(mask[start:start + len(call)])
    assert sum(mask) == len(call)


def test_parser_splits_content_and_calls():
    from spud.serve.structured import ToolCallParser

    text = 'Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    content, calls = ToolCallParser({"add"}).parse(text)
    assert content == "Let me add." and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    # an unknown function or broken JSON stays content: nothing the model wrote is dropped
    for bad in ['<tool_call>{"name": "sub", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>", "<tool_c"]:
        assert ToolCallParser({"add"}).parse(bad) == (bad, [])
    # streamed in 1-character pieces: a partial marker is held back, never shown as content
    p, shown, got = ToolCallParser({"add"}), "", []
    for ch in text:
        out, calls = p.push(ch)
        shown, got = shown + out, got + calls
        assert "<" not in shown
    assert shown + p.finish() == "Let me add.\n" and len(got) == 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_call_round_trip(tclient, choice):
    tools = [WEATHER, ADD]
    r = tclient.chat.completions.create(model="random", messages=ASK, tools=tools, tool_choice=choice,
                                        temperature=0, max_tokens=150, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    args = json.loads(call.function.arguments)
    if call.function.name == "add":
        assert set(args) == {"a", "b"} and all(0 <= v <= 99 for v in args.values())
    else:
        assert choice == "required" and args["city"] in ("Paris", "Oslo")
    # the result goes back as a tool message; the model answers (tools still offered)
    history = [*ASK, c.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "5"}]
    r2 = tclient.chat.completions.create(model="random", messages=history, tools=tools, tool_choice="none",
                                         temperature=0, max_tokens=8)
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r2.choices[0].message.content, str) and not r2.choices[0].message.tool_calls
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt


def test_streamed_tool_calls(tclient):
    stream = tclient.chat.completions.create(model="random", messages=ASK, tools=[ADD], tool_choice="required",
                                             temperature=1.0, seed=1, max_tokens=150, stream=True,
                                             parallel_tool_calls=False)
    calls, finish = {}, None
    for chunk in stream:
        for ch in chunk.choices:
            for tc in ch.delta.tool_calls or []:
                calls.setdefault(tc.index, tc)
            assert not (ch.delta.content or "").strip().startswith("<tool_call>")
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0].function.name == "add" and calls[0].id.startswith("call_")
    assert set(json.loads(calls[0].function.arguments)) == {"a", "b"}


@pytest.mark.parametrize("body, param", [
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_fields_are_400(tserver, body, param):
    r = httpx.post(tserver.url + "/v1/chat/completions", timeout=30,
                   json={"model": "random", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
