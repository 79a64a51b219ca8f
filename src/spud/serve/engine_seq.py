"""Engine-thread state of one request (`Seq`) and how a failure is described to its client.

Kept apart from the scheduler (engine.py) so the modules that extend the decode step
(speculative decoding, image inputs) share one definition without importing the engine.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from spud.errors import SpudError
from spud.serve.detok import Detokenizer
from spud.serve.engine_types import RequestHandle, SamplingParams


class Seq:
    """Engine-thread state of one request."""

    def __init__(self, handle: RequestHandle, prompt: list[int], params: SamplingParams,
                 end_ids: set[int], decode) -> None:
        self.handle = handle
        self.prompt = prompt
        self.params = params
        self.end_ids = end_ids
        self.detok = Detokenizer(decode, params.stop, params.incremental_text)
        self.slot = -1
        self.length = 0  # positions held in the KV slot
        self.prefilled = 0  # prompt tokens already written to the slot (chunked prefill)
        self.last = -1  # last sampled token: the next decode step's input
        self.end_token: int | None = None  # the end id that finished it, if one did
        self.generated = 0
        self.out_ids: list[int] = []  # sampled tokens (the prefix cache stores prompt + these)
        self.images = None  # a PromptImages (spud.serve.prompt_images) when the prompt has images
        self._prompt_tuple: tuple[int, ...] | None = None  # see prompt_tuple
        self.done = False
        self.gen: torch.Generator | None = None
        if params.temperature > 0:
            # CPU generator whatever the device: the draws (one per token) are tiny, and a seed
            # then gives the same uniforms on every machine.
            self.gen = torch.Generator()
            if params.seed is not None:
                self.gen.manual_seed(int(params.seed))
            else:
                self.gen.seed()

    @property
    def prompt_tuple(self) -> tuple[int, ...]:
        """The prompt as a tuple (it never changes), made once: the engine's prefill compares
        prompts every step to find copies of one (engine_forward._prefill_key)."""
        if self._prompt_tuple is None:
            self._prompt_tuple = tuple(self.prompt)
        return self._prompt_tuple


def describe(e: BaseException) -> str:
    if isinstance(e, SpudError):
        return str(e)
    # Not user input: name the exception and where it came from, for the server log / client.
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}{where}"
