"""`spud serve RUN`: load a run into an Engine, wrap it in the API and serve it with uvicorn.

Shutdown order matters. On SIGTERM/SIGINT uvicorn stops accepting connections and waits for the
in-flight responses; we first flip the app into draining mode (new requests on kept-alive
connections get 503, /health reports it so a load balancer stops routing here), give running
requests DRAIN_SECONDS to finish, let uvicorn cancel whatever is left (which cancels their engine
requests), and only then stop the engine thread. The engine is stopped inside uvicorn's own
shutdown rather than after `server.run()` returns, because uvicorn re-raises the captured signal
once it is done, and for SIGTERM that ends the process before any code after run() could execute.
"""

from __future__ import annotations

import asyncio
import json
import shlex

import uvicorn

from spud.serve.api import create_app

DRAIN_SECONDS = 5


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, engine):
        super().__init__(config)
        self._app, self._engine = app, engine

    def handle_exit(self, sig, frame) -> None:
        self._app.state.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        self._app.state.draining = True
        try:
            await super().shutdown(sockets)
        finally:
            # abort=True: anything still queued has no client waiting for it any more
            await asyncio.to_thread(self._engine.shutdown, True)


def build_server(engine, host: str, port: int, api_key: str | None = None,
                 log_level: str = "info") -> uvicorn.Server:
    """The uvicorn server for an already started engine (tests run it in a thread)."""
    app = create_app(engine, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=DRAIN_SECONDS)
    return _Server(config, app, engine)


def _banner(engine, host: str, port: int, api_key: str | None) -> str:
    shown = "[::1]" if host == "::1" else ("127.0.0.1" if host in ("0.0.0.0", "") else host)
    url = f"http://{shown}:{port}"
    body = json.dumps({"model": engine.model_name, "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $SPUD_API_KEY"' if api_key else ""
    kind = getattr(engine, "model_kind", None)
    which = ""
    if kind is not None:
        which = f"  model: {kind} model, checkpoint {engine.checkpoint}\n"
        if kind == "base":
            # allowed on purpose (a pretrained-only run is served as base, and its chat page is
            # how people first poke at it), but the replies are continuations, not answers
            which += ("  note:  a base (pretrained) model, not fine-tuned for chat: "
                      "/v1/completions continues text; /v1/chat/completions only continues the chat template\n")
    from spud.serve.images import vision_of

    vision = vision_of(engine)
    if vision is not None:
        which += (f"  images: chat messages take image_url parts (base64 data: URLs); each image is "
                  f"{vision.tokens_per_image} prompt tokens\n")
    return (
        f"Serving model {engine.model_name!r} (context {engine.max_context} tokens) at {url}/v1\n"
        f"{which}"
        f"  docs: {url}/docs   health: {url}/health   metrics: {url}/metrics\n"
        f"  try:  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"          -d {shlex.quote(body)}"
    )


def serve(run_dir: str, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int,
          checkpoint: str | None, device: str, model: str | None = None, **engine_options) -> None:
    """Blocking: serve until SIGINT/SIGTERM, then drain and stop the engine. `model`: "base",
    "chat", or None for the chat model when RUN has one, else the base model. `engine_options`:
    further Engine settings (prefill_chunk, prefix_cache_tokens)."""
    from spud.serve.engine import Engine

    engine = Engine.from_run(run_dir, checkpoint=checkpoint, device=device, model=model,
                             max_batch=max_batch, max_queue=max_queue, **engine_options)
    engine.start()
    try:
        server = build_server(engine, host, port, api_key)
        print(_banner(engine, host, port, api_key), flush=True)
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled; we are done anyway
        pass
    finally:
        engine.shutdown(abort=True)  # idempotent; covers a failure before uvicorn started
