"""Which arithmetic facts and wordings the built-in generators hold out for evaluation, and how
to find arithmetic facts in any text.

Two things are held out, both decided by a hash so that every generator (pretraining documents,
SFT conversations, eval sets) agrees without sharing state:

- facts: a *derivable* operation (a sum or difference with a two-digit operand, a product or
  quotient outside the 12×12 table) whose canonical form hashes into 1 of `FACT_SHARDS` buckets
  is never written by a training generator; the eval sets draw only from those. Table facts
  (single-digit sums, 12×12 products) are never held out: they are the steps every longer
  computation is made of (a column addition writes "7 + 8 = 15"), learnt by heart, not derived.
- wordings: a template whose id hashes into 1 of `TEMPLATE_SHARDS` buckets is eval-only
  (see spud.data.templates).

`extract_facts` finds "a op b" in any text (digits or number words, symbols or operator words);
the generators use it to double-check what they emit, and spud.eval.decontam uses it to scan a
run's training data for the eval sets' facts.
"""

from __future__ import annotations

import hashlib
import re

FACT_SHARDS = 16      # 1 in 16 derivable facts is eval-only
TEMPLATE_SHARDS = 4   # 1 in 4 wordings is eval-only

Fact = tuple[str, int, int]


def canonical(op: str, a: int, b: int) -> Fact:
    """Sums and products are the same fact in either order ("31 + 88" is "88 + 31")."""
    if op in "+*" and a > b:
        a, b = b, a
    return op, int(a), int(b)


def derivable(op: str, a: int, b: int) -> bool:
    """Facts computed from smaller ones (and so fair to hold out), as opposed to table facts."""
    if op == "+":
        return max(a, b) >= 10
    if op == "-":  # 13 - 8 is a table fact: the borrow step of every column subtraction
        return a >= 20 or b >= 10
    if op == "*":
        return max(a, b) > 12
    return b > 12 or a > 12 * max(b, 1)


def _bucket(key: str, shards: int) -> bool:
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % shards == 0


def fact_held_out(op: str, a: int, b: int) -> bool:
    op, a, b = canonical(op, a, b)
    return derivable(op, a, b) and _bucket(f"spud-fact/{op} {a} {b}", FACT_SHARDS)


def any_held_out(facts) -> bool:
    return any(fact_held_out(*f) for f in facts)


def template_held_out(family: str, template_id: str) -> bool:
    return _bucket(f"spud-template/{family}/{template_id}", TEMPLATE_SHARDS)


# ------------------------------------------------------------------------------ number words
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * i for i, w in enumerate(_TENS) if w}


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words: 119 → "one hundred nineteen", 31 → "thirty-one"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words handles 0..999999, got {n}")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _UNITS[n % 10])
    if n < 1000:
        rest = n % 100
        return _UNITS[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


_WORD = "|".join(sorted(_VALUE, key=len, reverse=True)) + "|hundred|thousand"
_NUMBER_WORDS = frozenset(_VALUE)
_LETTERS = re.compile(r"[a-z]+")
_WORD_RUN = re.compile(rf"\b(?:{_WORD})(?:(?:[\s-]+|\s+and\s+)(?:{_WORD}))*\b")


def _parse_words(phrase: str) -> int | None:
    total, cur, seen = 0, 0, False
    for w in re.split(r"[\s-]+", phrase):
        if w == "and":
            continue
        if w in ("hundred", "thousand"):
            if not seen:
                return None
            if w == "hundred":
                cur *= 100
            else:
                total, cur = total + cur * 1000, 0
        else:
            cur += _VALUE[w]
            seen = True
    return total + cur if seen else None


def words_to_digits(text: str) -> str:
    """Lower-cased text with runs of number words replaced by digits ("thirty-one" → "31")."""
    def sub(m: re.Match) -> str:
        v = _parse_words(m.group(0))
        return m.group(0) if v is None else str(v)
    low = text.lower()
    if _NUMBER_WORDS.isdisjoint(_LETTERS.findall(low)):  # most text has none: skip the slow scan
        return low
    return _WORD_RUN.sub(sub, low)


# ------------------------------------------------------------------------------- fact finding
_NUM = r"(?<![\d.,])(\d{1,9})(?!\d|[.,]\d)"
_OPS = {"+": "+", "plus": "+", "-": "-", "−": "-", "minus": "-", "*": "*", "×": "*", "x": "*",
        "times": "*", "multiplied by": "*", "/": "/", "÷": "/", "divided by": "/"}
_INFIX = re.compile(rf"{_NUM}\s*(\+|-|−|\*|×|/|÷| x |plus|minus|times|multiplied by|divided by)\s*{_NUM}")
_VERBAL = [  # (keywords, pattern, op, group order): requests that name the operation with a verb
    (("add", "sum of", "total of"),
     re.compile(rf"\b(?:add|sum of|total of)\s+{_NUM}\s+(?:and|to)\s+{_NUM}"), "+", (1, 2)),
    (("subtract",), re.compile(rf"\bsubtract\s+{_NUM}\s+from\s+{_NUM}"), "-", (2, 1)),
    (("difference between",), re.compile(rf"\bdifference between\s+{_NUM}\s+and\s+{_NUM}"), "-", (1, 2)),
    (("multiply", "product of"),
     re.compile(rf"\b(?:multiply|product of)\s+{_NUM}\s+(?:and|by)\s+{_NUM}"), "*", (1, 2)),
    (("divide",), re.compile(rf"\bdivide\s+{_NUM}\s+by\s+{_NUM}"), "/", (1, 2)),
]
_MAYBE = re.compile(r"[+\-−*×/÷]| x |plus|minus|times|divided|multipl|add|sum of|total of|subtract|"
                    r"difference|product")


def extract_facts(text: str, numbers: frozenset | set | None = None) -> set[Fact]:
    """Canonical (op, a, b) of every "a op b" in `text`: "17 + 25", "seventeen plus twenty-five",
    "add 31 and 88", "subtract 5 from 40", "12 x 4". A chain ("2 + 3 + 4") yields its first pair;
    the generators write every step as an equation of its own, so none of their facts is missed.
    `numbers` (digit strings): keep only facts whose operands are both among them, which spares
    building a tuple for every equation of a large text when only a few facts are looked for."""
    low = text.lower()
    if not _MAYBE.search(low):
        return set()
    low = words_to_digits(low)
    out = set()
    for m in _INFIX.finditer(low):
        a, b = m.group(1), m.group(3)
        if numbers is None or (a in numbers and b in numbers):
            out.add(canonical(_OPS[m.group(2).strip()], int(a), int(b)))
    for keys, pat, op, (i, j) in _VERBAL:
        if any(k in low for k in keys):  # a substring test is far cheaper than the regex scan
            for m in pat.finditer(low):
                a, b = m.group(i), m.group(j)
                if numbers is None or (a in numbers and b in numbers):
                    out.add(canonical(op, int(a), int(b)))
    return out
