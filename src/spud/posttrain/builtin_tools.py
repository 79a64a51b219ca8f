"""The built-in tool: a calculator, and the chat data that teaches a model to call it.

Records are in the OpenAI fine-tuning format ({"messages": [...], "tools": [...]}: an assistant
turn with `tool_calls`, then a "tool" turn with the result), so `spud sft` reads them exactly as
it reads a user's JSONL with tools, and the chat template renders them as the server does
(spud.tokenizer: TOOL_CALL_OPEN ... TOOL_CALL_CLOSE). Two kinds of conversation:

- calls: an arithmetic request (the chat data's wordings, operands up to four digits, products
  and quotients beyond the 12×12 table, bracketed expressions) with the calculator offered; the
  assistant calls it with the expression, the tool returns the value, the assistant answers
  with it ("4821 + 3397 = 8218.");
- direct: the calculator is offered but the request is not arithmetic (instructions, small talk),
  and the assistant answers without a call.

Only one tool: the tool listing the template writes into the system turn costs ~150 tokens with
the demo's tokenizer, so a second definition would not fit the demo's 256-token context.
Held out as the rest of the chat data (spud.data.facts): training requests use training
wordings only, and a conversation stating an eval-only fact anywhere (question, call, result or
answer) is redrawn; spud.posttrain.chat_eval.tool_items draws the eval questions from the rest.
"""

from __future__ import annotations

import ast
import json
import random
from fractions import Fraction

from spud.data import templates
from spud.data.facts import any_held_out, extract_facts

CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]},
}
TOOLS = [{"type": "function", "function": CALCULATOR}]
CALL_SHARE = 0.75  # of the tool records: the rest are "direct" (tool offered, not needed)
MAX_EXPRESSION = 200  # characters the calculator accepts
_PREFACES = ["Let me calculate that.", "I'll use the calculator.", "Let me check with the calculator."]


# ----------------------------------------------------------------------------------- the tool
class CalculatorError(ValueError):
    """An expression the calculator refuses; its message is what the tool returns."""


_BINARY = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def _value(node: ast.AST) -> Fraction:
    """Exact arithmetic over + - * / and brackets; anything else (names, calls, powers) refused,
    so a model's argument is never executed as Python."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        d = _value(node.right)
        if d == 0:
            raise CalculatorError("division by zero")
        return _value(node.left) / d
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_value(node.left), _value(node.right))
    raise CalculatorError("only numbers, + - * / and brackets are allowed")


def calculate(expression: str) -> str:
    """The calculator tool: "31 + 88" → "119", "7 / 2" → "3.5" (at most 6 decimals), or
    "error: ..." for what it cannot evaluate (that text is the tool's result, not an exception)."""
    try:
        if not isinstance(expression, str) or not expression.strip():
            raise CalculatorError("empty expression")
        if len(expression) > MAX_EXPRESSION:
            raise CalculatorError(f"expression longer than {MAX_EXPRESSION} characters")
        text = expression.replace("×", "*").replace("÷", "/").replace("−", "-")
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError:
            raise CalculatorError("not an arithmetic expression") from None
        v = _value(tree.body)
    except CalculatorError as e:
        return f"error: {e}"
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.6f}".rstrip("0").rstrip(".")


def run_tool_call(call: dict) -> str:
    """The result of one OpenAI tool call ({"function": {"name", "arguments"}}) to the calculator."""
    f = call.get("function", {})
    if f.get("name") != CALCULATOR["name"]:
        return f"error: unknown tool {f.get('name')!r}"
    try:
        args = json.loads(f.get("arguments") or "{}")
    except ValueError:
        return "error: arguments are not JSON"
    expr = args.get("expression") if isinstance(args, dict) else None
    return calculate(expr) if isinstance(expr, str) else 'error: "expression" (a string) is required'


def tool_call(expression: str, i: int) -> dict:
    """An OpenAI-style call of the calculator (arguments are a JSON string, as the API sends them)."""
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": CALCULATOR["name"], "arguments": json.dumps({"expression": expression})}}


# ------------------------------------------------------------------------------- the requests
def request(rng: random.Random, held_out: bool) -> tuple[str, str, str, int, tuple]:
    """→ (wording id, question, expression, value, (op, a, b)) for one operation in the
    calculator's range: + and - on 1-4 digit numbers, products of two numbers up to 99, exact
    quotients with divisor and quotient up to 99, in a training or an eval-only wording."""
    op = rng.choice("+-*/")
    if op in "+-":
        def size() -> int:
            d = rng.choices([1, 2, 3, 4], weights=[10, 35, 30, 25])[0]
            return rng.randint(0, 9) if d == 1 else rng.randint(10 ** (d - 1), 10**d - 1)
        a, b = size(), size()
        if op == "-":
            a, b = max(a, b), min(a, b)
        c = a + b if op == "+" else a - b
    elif op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        c = a * b
    else:
        b, c = rng.randint(2, 99), rng.randint(2, 99)
        a = b * c
    tid, q = templates.ask(rng, op, a, b, held_out=held_out, words=0.0 if held_out else 0.1,
                           distract=0.3 if held_out else 0.15)
    return tid, q, f"{a} {op} {b}", c, (op, a, b)


def _bracketed(rng: random.Random) -> tuple[str, str, int]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
    op1, op2 = rng.choice("+-"), rng.choice("+-*")
    if op1 == "-":
        a, b = max(a, b), min(a, b)
    expr = f"({a} {op1} {b}) {op2} {c}"
    value = int(calculate(expr))
    q = rng.choice([f"What is ({a} {op1} {b}) {op2} {c}?", f"Compute ({a} {op1} {b}) {op2} {c}.",
                    f"Work out ({a} {op1} {b}) {op2} {c}.", f"Evaluate ({a} {op1} {b}) {op2} {c}."])
    return q, expr, value


def _final(rng: random.Random, expr: str, value: int) -> str:
    forms = [f"{expr} = {value}.", f"The answer is {value}.", f"{expr} = {value}, so the answer is {value}."]
    return rng.choices(forms, weights=[6, 3, 1])[0]


def call_conversation(rng: random.Random) -> list[dict]:
    """A calculator request → the call → the tool's result → the answer (training wordings)."""
    if rng.random() < 0.15:
        q, expr, value = _bracketed(rng)
    else:
        _, q, expr, value, _ = request(rng, held_out=False)
    preface = rng.choice(_PREFACES) if rng.random() < 0.2 else None
    return [{"role": "user", "content": q},
            {"role": "assistant", "content": preface, "tool_calls": [tool_call(expr, 0)]},
            {"role": "tool", "tool_call_id": "call_0", "content": calculate(expr)},
            {"role": "assistant", "content": _final(rng, expr, value)}]


def direct_conversation(rng: random.Random) -> list[dict]:
    """The calculator is offered, the request needs no arithmetic: answered without a call."""
    from spud.posttrain.builtin_chat import non_arithmetic_turn  # noqa: PLC0415 (it imports us)

    q, a = non_arithmetic_turn(rng)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def record_text(messages: list[dict]) -> str:
    """Everything a conversation states (contents, call arguments, results), one message a line:
    what the held-out check here and spud.eval.decontam read."""
    lines = []
    for m in messages:
        if isinstance(m.get("content"), str) and m["content"]:
            lines.append(m["content"])
        for c in m.get("tool_calls") or []:
            f = c.get("function", c) if isinstance(c, dict) else {}
            lines.append(f"{f.get('name', '')} {f.get('arguments', '')}")
    return "\n".join(lines)


def tool_records(n: int, seed: int) -> list[dict]:
    """n tool conversations in the OpenAI fine-tuning format; the same (n, seed) gives the same
    list, and a longer list starts with the shorter one."""
    rng = random.Random(f"spud-builtin-tools/{seed}")
    out = []
    for _ in range(n):
        make = call_conversation if rng.random() < CALL_SHARE else direct_conversation
        while True:  # redraw a conversation that states an eval-only fact
            msgs = make(rng)
            if not any_held_out(extract_facts(record_text(msgs))):
                break
        out.append({"messages": msgs, "tools": TOOLS})
    return out
