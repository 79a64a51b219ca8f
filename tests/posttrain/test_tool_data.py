"""The built-in tool data (spud.posttrain.builtin_tools): well-formed calculator conversations that
the chat template renders and the server's tool-call parser reads back, the sft.tool_share knob,
the held-out tool eval split and its scoring."""

import json
import re

import pytest
from sft_helpers import SFT_OVERRIDES

from spud.data import templates
from spud.data.facts import extract_facts, fact_held_out
from spud.errors import SpudError
from spud.posttrain import builtin_chat, builtin_tools, chat_eval
from spud.posttrain.builtin_tools import CALCULATOR, calculate, run_tool_call
from spud.posttrain.chat_data import function_of, load_chat_data
from spud.posttrain.sft import sft_config
from spud.serve.structured import ToolCallParser
from spud.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESULT_OPEN, Tokenizer


@pytest.fixture(scope="module")
def tok(base_template):
    return Tokenizer.load(base_template / "tokenizer.json")


def test_calculator_is_exact_and_refuses_anything_but_arithmetic():
    assert calculate("31 + 88") == "119" and calculate("(12 - 8) * 12") == "48"
    assert calculate("4275 / 45") == "95" and calculate("7 / 2") == "3.5" and calculate("-3 - 4") == "-7"
    assert calculate("10 / 3") == "3.333333" and calculate("2 × 3 ÷ 4") == "1.5"
    for bad, why in [("1 / 0", "division by zero"), ("__import__('os')", "only numbers"), ("2 ** 8", "only numbers"),
                     ("", "empty"), ("1 +", "not an arithmetic"), ("1" * 300, "longer than")]:
        assert calculate(bad).startswith("error:") and why in calculate(bad), bad
    call = builtin_tools.tool_call("6 * 7", 0)
    assert run_tool_call(call) == "42"
    assert run_tool_call({"function": {"name": "calculator", "arguments": "{}"}}).startswith("error:")
    assert run_tool_call({"function": {"name": "weather", "arguments": "{}"}}).startswith("error: unknown tool")


def test_tool_records_round_trip_through_the_template_and_the_servers_parser(tok):
    recs = builtin_tools.tool_records(120, 0)
    assert recs == builtin_tools.tool_records(120, 0) and recs[:50] == builtin_tools.tool_records(50, 0)
    calls = [r for r in recs if any(m.get("tool_calls") for m in r["messages"])]
    assert 70 < len(calls) < 110 and len(recs) - len(calls) > 10  # 3 in 4 call, the rest answer directly
    for r in recs:
        msgs = r["messages"]
        ids, mask = tok.render_chat(msgs, tools=[function_of(t) for t in r["tools"]])
        text = tok.decode(ids)
        assert '"name": "calculator"' in text.split("<|user|>")[0]  # the tool is listed in the system turn
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        if r not in calls:
            assert TOOL_CALL_OPEN not in trained and [m["role"] for m in msgs] == ["user", "assistant"]
            continue
        assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
        # what the model is trained to write in the call turn is what the server parses back
        call_turn = trained.split("<|end|>")[0]
        assert call_turn.count(TOOL_CALL_OPEN) == 1 and call_turn.endswith(TOOL_CALL_CLOSE)
        content, parsed = ToolCallParser({"calculator"}).parse(call_turn)
        assert content == msgs[1]["content"] and len(parsed) == 1
        assert json.loads(parsed[0]["function"]["arguments"]) == json.loads(
            msgs[1]["tool_calls"][0]["function"]["arguments"])
        # the tool's turn is input (a user turn), not a target; the result is the calculator's
        assert TOOL_RESULT_OPEN + msgs[2]["content"] in text and TOOL_RESULT_OPEN not in trained
        assert run_tool_call(parsed[0]) == msgs[2]["content"]
        assert chat_eval.final_number(msgs[3]["content"]) == int(msgs[2]["content"])


def test_sft_reads_tool_records_exactly_as_render_chat_renders_them(tok):
    (src,) = load_chat_data(["builtin"], tok, 2000, 0.0, 0.0, 200, 3, tool_share=0.2)
    recs = builtin_chat.records(200, 3, 0.2)
    assert src.summary["tool_conversations"] == 40 == sum("tools" in r for r in recs)
    assert src.summary["tool_conversations_too_long"] == 0 and src.summary["bad"] == 0
    for conv, r in zip(src.train, recs):
        tools = [CALCULATOR] if "tools" in r else None  # the definition as a client sends it to the server
        assert (conv.ids, conv.mask) == tuple(map(list, tok.render_chat(r["messages"], tools=tools)))
    # the plain part is the tool-free data, unchanged by the share
    assert [r["messages"] for r in recs[:160]] == builtin_chat.conversations(160, 3)
    # a context too short for the tool listing: tool conversations are skipped and counted, not bad
    (short,) = load_chat_data(["builtin"], tok, 161, 0.0, 0.05, 200, 3, tool_share=0.2)
    assert short.summary["tool_conversations_too_long"] == 40 and short.summary["bad"] <= 10


def test_a_jsonl_file_with_tools_is_read_and_bad_tool_lines_are_named(tok, tmp_path):
    good = builtin_tools.tool_records(4, 1)
    bad_calls = {"messages": [{"role": "user", "content": "1+1"},
                              {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "c",
                                                                                     "arguments": "not json"}}]}]}
    bad_tools = {"messages": good[0]["messages"], "tools": [{"type": "function", "function": {}}]}
    surrogate = {"messages": [*good[0]["messages"][:2], {"role": "tool", "content": "\ud800"}],
                 "tools": good[0]["tools"]}
    f = tmp_path / "tools.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in [*good, bad_calls, bad_tools, surrogate]) + "\n")
    (src,) = load_chat_data([str(f)], tok, 2000, 0.0, 0.5, 0, 0)
    bad = {b["where"]: b["reason"] for b in src.summary["bad_lines"]}
    assert set(bad) == {f"{f}:5", f"{f}:6", f"{f}:7"}
    assert "tool_calls" in bad[f"{f}:5"] and '"tools"' in bad[f"{f}:6"] and "surrogate" in bad[f"{f}:7"]
    assert src.summary["tool_conversations"] == 4 and len(src.train) == 4


@pytest.mark.parametrize("value", ["1.5", "-0.1", "lots"])
def test_bad_tool_share_is_an_error_naming_the_field(base_run, value):
    with pytest.raises(SpudError, match=r"sft\.tool_share"):
        sft_config(base_run, ["builtin"], base_run / "chat", [*SFT_OVERRIDES, f"sft.tool_share={value}"], resume=False)
    assert sft_config(base_run, ["builtin"], base_run / "chat", SFT_OVERRIDES, resume=False).sft.tool_share == 0.1


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[ab]\}", template)
    return re.compile("(?:^|[.!] )" + r"(.+?)".join(re.escape(p) for p in parts) + "$")


def test_tool_eval_split_is_held_out_from_the_tool_data_by_construction():
    items = chat_eval.tool_items(100)
    assert items == chat_eval.tool_items(100) and len({it.question for it in items}) == 100
    assert {it.facts[0][0] for it in items} == set("+-*/")
    assert all(fact_held_out(*it.facts[0]) for it in items)
    ids = {it.template.split("+")[0] for it in items}
    assert ids <= {i for op in "+-*/" for i, _ in templates.ask_templates(op, True)}
    # the training side: no eval-only fact or wording anywhere in 3000 tool conversations
    recs = builtin_tools.tool_records(3000, 0)
    texts = [builtin_tools.record_text(r["messages"]) for r in recs]
    facts = [f for t in texts for f in extract_facts(t)]
    assert len(facts) > 2000 and not any(fact_held_out(*f) for f in facts)
    held = [_pattern(t) for op in "+-*/" for _, t in templates.ask_templates(op, True)]
    asks = [r["messages"][0]["content"] for r in recs]
    assert not [q for q in asks if any(p.search(q) for p in held)]
    assert not {it.question for it in items} & set(asks)


def test_tool_eval_scoring_with_a_scripted_model(monkeypatch):
    """Each outcome scored as documented: a right call and answer, a call with a wrong expression,
    a malformed call, a right direct answer; and a direct prompt answered with a call."""
    items = chat_eval.tool_items(4, seed=5)
    call = TOOL_CALL_OPEN + '{"name": "calculator", "arguments": {"expression": "%s"}}' + TOOL_CALL_CLOSE
    a = items[0].reference.split(" =")[0]
    first = [call % a, call % "1 + 1", TOOL_CALL_OPEN + '{"name": "calculator", "arguments": {"expr": 3}}'
             + TOOL_CALL_CLOSE, f"It is {items[3].answer}.", "Hello!", call % "2 + 2"]
    second = iter([[f"{a} = {items[0].answer}.", "1 + 1 = 2.", "The answer is 7."]])
    seen = []

    def scripted(model, tok, prompts, max_tokens, stop):
        seen.append([tok.decode(p) for p in prompts])
        return first if len(seen) == 1 else next(second)

    monkeypatch.setattr(chat_eval, "_generate", scripted)

    class Model:
        cfg = type("C", (), {"max_seq_len": 4096})

    tok = _ToyTok()
    res = chat_eval.tool_accuracy(Model(), tok, items, direct=["Hi", "Name two fruits."])
    assert (res["called"], res["call_right"], res["after_call"], res["accuracy"]) == (0.5, 0.25, 0.25, 0.5)
    assert res["direct"] == {"n": 2, "no_call": 0.5}
    # the follow-up prompts carry the calculator's results as tool turns
    assert len(seen[1]) == 3 and f"tool:{items[0].answer}" in seen[1][0] and "tool:2" in seen[1][1]
    assert "tool:error:" in seen[1][2]


class _ToyTok:
    """Just enough of a tokenizer for the scripted scoring test: prompts as readable text."""

    def render_chat(self, messages, add_generation_prompt=False, tools=None):
        assert tools == [CALCULATOR]
        text = "|".join(f"{m['role']}:{m.get('content')}" for m in messages)
        return [ord(ch) for ch in text], None

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_chat_run_saved_before_tool_data_resumes_without_it(base_run):
    """Its saved sft section has no tool_share: resuming must not switch the data to the new default."""
    out = base_run / "chat"
    out.mkdir()
    (out / "config.yaml").write_text("sft:\n  data: [builtin]\n  max_steps: 8\n")
    assert sft_config(base_run, None, out, [], resume=True).sft.tool_share == 0.0
    (out / "config.yaml").write_text("sft:\n  data: [builtin]\n  tool_share: 0.3\n")
    assert sft_config(base_run, None, out, [], resume=True).sft.tool_share == 0.3


def test_chat_eval_counts_tool_calls_written_when_no_tool_is_offered(monkeypatch):
    items = chat_eval.eval_items("operands", 3)
    outs = [f"So x = {items[0].answer}.", TOOL_CALL_OPEN + '{"name": "calculator"}' + TOOL_CALL_CLOSE, "no idea"]
    monkeypatch.setattr(chat_eval, "_generate", lambda model, tok, prompts, max_tokens, stop: outs)

    class Model:
        cfg = type("C", (), {"max_seq_len": 4096})

    class Tok(_ToyTok):
        def render_chat(self, messages, add_generation_prompt=False, tools=None):
            assert tools is None  # the five splits offer no tool
            return [1, 2], None

    res = chat_eval.split_accuracy(Model(), Tok(), items, chat=True)["operands"]
    assert (res["correct"], res["tool_calls"], res["n"]) == (1, 1, 3)
