"""Programs that check an answer: the rewards of `spud rl` and the judges of generative evals.

Every verifier maps (completion text, reference) to a `Verdict`; none may raise: a verifier that
crashes or times out on a sample gives reward 0 and says why (`error`), and the RL loop counts
those instead of dying, because one odd sample must never kill an hour of rollouts.

- `numeric`: the final number of the answer (after the last "=", else the last number; commas and
  a trailing full stop allowed) equals the reference number.
- `math`: MATH-style answers, through the project's one maths checker (`math-verify` when
  installed, the built-in normaliser otherwise; spud.eval.math_norm).
- `code`: the completion plus the reference's unit tests pass in the eval sandbox (no network,
  time and memory caps).
- `output`: the completion's final line equals the expected printed output (for "what does this
  program print" tasks), compared after stripping whitespace and quotes.
- `format`: the answer sits where the task asks for it: the last line ends "= N." or says
  "The answer is N." — used as a small shaping bonus next to correctness.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL_FORM = re.compile(r"(?:=|answer is|answer:)\s*-?\d[\d,]*(?:\.\d+)?\s*\.?\s*$", re.I)
KINDS = ("numeric", "math", "code", "output")


@dataclass
class Verdict:
    correct: bool
    formatted: bool
    error: str | None = None  # why a verifier could not judge (crash, timeout): reward 0


def final_number(text: str) -> str | None:
    """The number after the last '=' (answers end "... = c."), else the last number."""
    tail = text.rsplit("=", 1)[-1]
    found = _NUMBER.findall(tail) or _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def _numbers_equal(a: str | None, b) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(str(b).replace(",", ""))
    except ValueError:
        return False


_EQUATION = re.compile(r"(-?\d+)\s*([+\-*×x])\s*(-?\d+)\s*=\s*(-?\d+)")


def equation_slips(text: str) -> tuple[int, int]:
    """(equations written as "a op b = c", how many of them are arithmetically wrong): tells a
    wrong answer whose every step is right (the plan was wrong) from an arithmetic slip."""
    eqs = _EQUATION.findall(text.replace(",", ""))
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "×": int.__mul__, "x": int.__mul__}
    return len(eqs), sum(ops[o](int(a), int(b)) != int(c) for a, o, b, c in eqs)


def steps_right(text: str) -> bool:
    """At least one "a op b = c" step written, and every one of them right: `spud rl`'s optional
    process reward (rl.step_weight). All-or-nothing, so padding an answer with easy true sums
    earns nothing once a single step slips."""
    n, wrong = equation_slips(text)
    return n > 0 and wrong == 0


def well_formed(text: str) -> bool:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return bool(lines) and bool(_FINAL_FORM.search(lines[-1]))


def _output_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1]
    # "It prints 42." / "Output: 42" → 42
    last = re.sub(r"^(?:it prints|the output is|output:|prints)\s*", "", last, flags=re.I)
    return last.strip().rstrip(".").strip("`'\" ")


def verify(kind: str, completion: str, reference, tests: str | None = None,
           timeout: float = 5.0) -> Verdict:
    """Judge one completion. Never raises."""
    try:
        formatted = well_formed(completion)
        if kind == "numeric":
            return Verdict(_numbers_equal(final_number(completion), reference), formatted)
        if kind == "math":
            from spud.eval.math_norm import extract_math, math_equal  # noqa: PLC0415

            pred = extract_math(completion) or final_number(completion)
            return Verdict(math_equal(pred, str(reference)), formatted)
        if kind == "output":
            got = _output_line(completion)
            return Verdict(got == str(reference).strip(), bool(got))
        if kind == "code":
            from spud.eval.sandbox import run_program  # noqa: PLC0415

            program = f"{completion}\n\n{tests or ''}\n"
            res = run_program(program, timeout=timeout)
            if res.status == "timeout":
                return Verdict(False, True, "timeout")
            return Verdict(res.status == "passed", True)
        return Verdict(False, False, f"unknown verifier {kind!r}")
    except Exception as e:  # noqa: BLE001 - a verifier failure is a zero reward, not a crash
        return Verdict(False, False, f"{type(e).__name__}: {e}")
