"""Structured output (response_format json_schema / json_object) through constrained decoding.

The model is the tiny run's tokenizer with RANDOM weights and a 512-token context: whatever it
would say, the grammar must make the answer parse and validate. Tested with the official openai
client's `chat.completions.parse` against a real server.
"""

from __future__ import annotations

import json
import threading
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import LiveServer

pytest.importorskip("llguidance")


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]
    tags: list[bool] = Field(max_length=3)


def random_engine(run, **limits):
    """The run's tokenizer with a randomly initialised model (fixed seed) and a longer context
    (tool definitions alone are ~450 tokens of this 400-token vocabulary)."""
    import torch

    from spud.model.registry import build_model
    from spud.runs import choose_model, load_choice
    from spud.serve.engine import Engine

    _net, tok, cfg = load_choice(choose_model(run, "base", None), "cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model.model_copy(update={"max_seq_len": 1024}))
    engine = Engine(model, tok, model_name="random", **limits)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def rserver(serve_run):
    srv = LiveServer(random_engine(serve_run, max_batch=8, max_queue=32))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def rclient(rserver):
    import openai

    return openai.OpenAI(base_url=rserver.url + "/v1", api_key="unused", max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "Describe a person."}]


def test_parse_greedy_and_sampled_validate(rclient):
    greedy = rclient.chat.completions.parse(model="random", messages=MSG, response_format=Person,
                                           temperature=0, max_tokens=200)
    choice = greedy.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    Person.model_validate_json(choice.message.content)
    sampled = rclient.chat.completions.parse(model="random", messages=MSG, response_format=Person,
                                            temperature=1.0, seed=3, n=3, max_tokens=200)
    assert [c.finish_reason for c in sampled.choices] == ["stop"] * 3
    for c in sampled.choices:
        assert isinstance(c.message.parsed, Person)


def test_constrained_rows_batched_with_free_ones(rserver, rclient):
    """A constrained request running beside unconstrained ones: its answer validates, and theirs
    are exactly what they are alone (the mask touches only its own row)."""
    def free(out, i):
        r = rclient.chat.completions.create(model="random", messages=[{"role": "user", "content": f"hi {i}"}],
                                            temperature=0, max_tokens=40)
        out[i] = r.choices[0].message.content

    alone = {}
    for i in range(3):
        free(alone, i)
    batched, parsed = {}, {}
    threads = [threading.Thread(target=free, args=(batched, i)) for i in range(3)]

    def constrained():
        r = rclient.chat.completions.parse(model="random", messages=MSG, response_format=Person,
                                          temperature=0, max_tokens=200)
        parsed["p"] = r.choices[0].message.parsed

    threads.append(threading.Thread(target=constrained))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batched == alone
    assert isinstance(parsed["p"], Person)


def test_json_object(rclient):
    r = rclient.chat.completions.create(model="random", messages=MSG, temperature=0, max_tokens=300,
                                        response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_completions_response_format(rserver):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = httpx.post(rserver.url + "/v1/completions", timeout=60, json={
        "model": "random", "prompt": "Number:", "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert 0 <= json.loads(r.json()["choices"][0]["text"])["n"] <= 9


@pytest.mark.parametrize("fmt, param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
      "properties": {"a": {"type": "string", "format": "no-such-format"}}}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 5,
                                                                      "maxLength": 2}}},
     "response_format.json_schema.schema"),  # unsatisfiable: no answer could ever be valid
    ({"type": "json_schema"}, "response_format"),
    ({"type": "xml"}, "response_format.type"),
])
def test_bad_response_format_is_400(rserver, fmt, param):
    r = httpx.post(rserver.url + "/v1/chat/completions", timeout=30,
                   json={"model": "random", "messages": MSG, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    # the server keeps serving
    assert httpx.get(rserver.url + "/health").status_code == 200
