"""What an evaluation example and a task are: the types every task source produces.

The bottom of the eval package: spud.eval.builtin_tasks (generated tasks) and spud.eval.tasks
(file formats, task specs) both build these, and only the latter imports the former.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spud.eval import math_norm

CODE_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


@dataclass
class Example:
    prompt: str                       # what the model continues (without few-shot examples)
    target: str                       # gold answer (gen), gold choice text (mc), '' (code)
    demo: str = ""                    # what follows the prompt when it is a few-shot example
    choices: list[str] | None = None  # mc: continuations, leading space included
    label: int | None = None          # mc: index of the right choice
    test: str | None = None           # code: the task's tests
    entry_point: str | None = None    # code: function passed to check() (HumanEval)
    where: str = ""                   # file:line or generator, for messages and outputs
    facts: tuple = ()                 # generated arithmetic: canonical (op, a, b) it asks (decontam)
    split: str = ""                   # generated tasks: which held-out split it belongs to


@dataclass
class Task:
    name: str
    kind: str                          # "mc" | "gen" | "code"
    examples: list[Example]
    fewshot_pool: list[Example] | None = None  # None: draw from `examples`, excluding self
    answer: str = "number"             # gen extraction: "first_number" | "gsm8k" | "math"
    stop: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 256
    separator: str = "\n\n"            # between few-shot examples
    source: str = "builtin"
    meta: dict = field(default_factory=dict)

    @property
    def baseline(self) -> float:
        """Accuracy of guessing: 1/#choices for multiple choice, 0 for free-form answers."""
        if self.kind != "mc" or not self.examples:
            return 0.0
        return sum(1 / len(e.choices) for e in self.examples) / len(self.examples)

    def extract(self, output: str) -> str | None:
        if self.answer == "gsm8k":
            return math_norm.extract_gsm8k(output)
        if self.answer == "math":
            return math_norm.extract_math(output)
        return math_norm.first_number(output)

    def is_correct(self, extracted: str | None, target: str) -> bool:
        if self.answer == "math":
            return math_norm.math_equal(extracted, target)
        return math_norm.numbers_equal(extracted, math_norm.normalize_number(target))
