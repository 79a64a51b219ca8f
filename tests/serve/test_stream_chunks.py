"""Streamed token chunks: the per-choice template reused for plain tokens (streaming.py) must
give byte for byte the chunks the response schema builds, for chat and completions, with
several choices interleaved and texts that need JSON escaping."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from spud.serve import protocol_responses as R
from spud.serve import streaming
from spud.serve.engine_types import FinishEvent, TokenEvent

TEXTS = ["a", "", 'h\u00e9llo "q"\n', "\u65e5\u672c", "\\u0000x", " end"]
CTX = {"id": "x-1", "created": 7, "model": "m"}


class _Handle:
    def __init__(self, texts):
        self.events = [TokenEvent(i, t, None, None) for i, t in enumerate(texts)]
        self.events.append(FinishEvent("length", "", 3, len(texts)))

    async def stream(self):
        for ev in self.events:
            yield ev
            await asyncio.sleep(0)  # let the other choice's pump run: interleaved chunks

    def cancel(self):
        pass


class _Metrics:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _expected(kind: str, k: int, text: str) -> str:
    if kind == "chat":
        choice = R.ChatChunkChoice(index=k, delta=R.ChatDelta(content=text))
        obj = R.ChatCompletionChunk(choices=[choice], **CTX)
    else:
        obj = R.CompletionResponse(choices=[R.CompletionChoice(index=k, text=text)], **CTX)
    return f"data: {json.dumps(obj.model_dump(exclude={'usage'}))}\n\n"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_token_chunks_equal_schema_built_ones(kind, monkeypatch):
    monkeypatch.setattr(streaming, "TokenTimer", lambda *a: SimpleNamespace(token=lambda: None))
    handles = [_Handle(TEXTS), _Handle(TEXTS[::-1])]

    async def run():
        req = SimpleNamespace(stream_options=None)
        return [s async for s in streaming.stream_events(
            kind, handles, CTX, [None, None], [0, 0], set(), req, 3, _Metrics(), "e", 0.0,
            None, None)]

    out = asyncio.run(run())
    tokens = [s for s in out if '"finish_reason": null' in s]
    assert len(tokens) == 2 * len(TEXTS)
    by_choice = {0: [], 1: []}
    for s in tokens:
        by_choice[json.loads(s[6:])["choices"][0]["index"]].append(s)
    assert by_choice[0] == [_expected(kind, 0, t) for t in TEXTS]
    assert by_choice[1] == [_expected(kind, 1, t) for t in TEXTS[::-1]]
    assert out[-1] == "data: [DONE]\n\n"
