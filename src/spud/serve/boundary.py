"""The HTTP boundary: what happens around the route handlers of the API app.

- `Guard`, a raw ASGI middleware in front of routing and parsing: API key, body-size limit and
  per-endpoint/status request counting, so an oversized or unauthenticated body is rejected
  without being buffered or parsed. It is also the last line for bugs: an exception from a
  handler stops here and becomes an OpenAI-shaped 500. (Starlette's own error middleware sends
  the 500 and then re-raises into uvicorn, which drops the connection, so the client's next
  request on that keep-alive connection failed.)
- Validation and HTTP errors as OpenAI-shaped 4xx (`param` = the field path).
- The OpenAPI document as the server really behaves: no stock 422, integer limits as integers.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from spud.serve import protocol as P
from spud.serve import protocol_responses as R
from spud.serve.metrics import ServerMetrics
from spud.serve.streaming import APIError

log = logging.getLogger("spud.serve")

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
KNOWN_ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                   "/health", "/metrics"}


class Guard:
    """API key, body-size limit and request counting, in front of routing and parsing."""

    def __init__(self, app, *, api_key: str | None, max_body: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]  # set when the response starts

        async def send_tracking(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            err = self._auth_error(scope)
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, err = await self._buffer_body(scope, receive)
            if err is not None:
                await err.response()(scope, receive, send_tracking)
            elif receive is not None:
                await self.app(scope, receive, send_tracking)
        except Exception as e:  # noqa: BLE001 - the boundary: a bug must not take the connection down
            log.exception("error while handling %s %s", scope["method"], scope["path"])
            if status[0] is not None:
                raise  # the response is half sent: only closing the connection can signal it
            await server_error(None, e)(scope, receive, send_tracking)
        finally:
            path = scope["path"]
            self.metrics.requests.labels(path if path in KNOWN_ENDPOINTS else "other",
                                         str(status[0] or 499)).inc()  # 499: client left first

    def _auth_error(self, scope) -> APIError | None:
        if not self.api_key or not scope["path"].startswith(PROTECTED_PREFIXES):
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = auth.partition(" ")
        # compare_digest: the time taken must not reveal how many leading characters matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        return None

    async def _buffer_body(self, scope, receive):
        """Read the whole body (bounded) and hand the app a receive() that replays it. Checking the
        header alone is not enough: chunked uploads have no Content-Length, and clients can lie."""
        too_big = APIError(413, f"request body exceeds {self.max_body} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return receive, APIError(400, "invalid Content-Length header")
            if int(declared) > self.max_body:
                return receive, too_big
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None, None  # client gone before sending its body: nothing to answer
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                return receive, too_big
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: disconnect detection still works

        return replay, None


# ---------------------------------------------------------------------------- error mapping
def _param_path(loc) -> str | None:
    """('body', 'messages', 0, 'role') → 'messages[0].role'. Pydantic puts union-member tags such
    as 'list[int]' or 'constrained-int' into the path; they are not fields, so stop there."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier() or part in {"str", "int", "float", "bool", "list", "dict"}:
            break
        else:
            out += f".{part}" if out else part
    return out or None


def _most_specific(errors: list[dict]) -> dict:
    """The error to report. A union field (`stop`: a string or a list of at most 4) fails once per
    member; "Input should be a valid string" is the least useful of those when the client clearly
    sent a list that is too long. So among the first field's errors, prefer one that is not a
    plain type mismatch."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    param = _param_path(tuple(errors[0].get("loc", ())))
    same = [e for e in errors if _param_path(tuple(e.get("loc", ()))) == param]
    specific = [e for e in same if not str(e.get("type", "")).endswith("_type")]
    return (specific or same)[0]


def validation_error(_req, exc: RequestValidationError) -> JSONResponse:
    first = _most_specific(exc.errors())
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON", code="invalid_json").response()
    param = _param_path(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param).response()


def http_error(_req, exc: StarletteHTTPException) -> JSONResponse:
    msg = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, msg).response(headers=getattr(exc, "headers", None))


def server_error(_req, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal server error ({type(exc).__name__})", type="server_error").response()


def openapi_document(app: FastAPI, model_name: str, vocab_size: int, context: int) -> dict:
    """FastAPI's document, made to say what this server enforces: no stock 422 "Validation Error"
    (every validation error is a 400 in OpenAI's shape, documented per route), and the limits
    that depend on the served model written in: `model` must be its name, token ids (prompts,
    /detokenize, logit_bias keys) must be below its vocabulary size, max_tokens within its
    context."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in doc.get("paths", {}).values():
            for op in operations.values():
                op.get("responses", {}).pop("422", None)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        # streamed chunks are no route's response_model, but the event-stream docs refer to them
        chunk = R.ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}",
                                                        mode="serialization")
        for name, schema in [*chunk.pop("$defs", {}).items(), ("ChatCompletionChunk", chunk)]:
            schemas.setdefault(name, schema)
        _integer_limits(doc)
        _server_limits(doc, model_name, vocab_size, context)
        app.openapi_schema = doc
    return app.openapi_schema


def _server_limits(node, model_name: str, vocab_size: int, context: int) -> None:
    """Replace protocol.py's markers with standard JSON Schema keywords."""
    if isinstance(node, dict):
        if P.NEW_TOKENS in node:
            node["maximum"] = context - node.pop(P.NEW_TOKENS)
        if node.pop(P.TOKEN_ID, False):
            node["maximum"] = vocab_size - 1
        if node.pop(P.TOKEN_ID_KEYS, False):
            node["propertyNames"] = {"pattern": int_range_pattern(vocab_size - 1)}
        if node.pop(P.MODEL_NAME, False):
            for alt in node.get("anyOf", [node]):
                if alt.get("type") == "string":
                    alt["enum"] = [model_name]
        for v in node.values():
            _server_limits(v, model_name, vocab_size, context)
    elif isinstance(node, list):
        for v in node:
            _server_limits(v, model_name, vocab_size, context)


def int_range_pattern(hi: int) -> str:
    """A regex matching the decimal integers 0..hi (no leading zeros, as the server parses them):
    for 447, `[0-9]|[1-9][0-9]|[1-3][0-9]{2}|4[0-3][0-9]|44[0-7]`."""
    s = str(hi)
    if len(s) == 1:
        return f"^[0-{s}]$"
    parts = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, len(s))]
    for i, d in enumerate(s):
        low, top, rest = (1 if i == 0 else 0), int(d) - 1, len(s) - i - 1
        if i == len(s) - 1:
            parts.append(f"{s[:i]}[{low}-{d}]" if int(d) > low else f"{s[:i]}{d}")
        elif top >= low:
            parts.append(f"{s[:i]}[{low}-{top}]" + (f"[0-9]{{{rest}}}" if rest > 1 else "[0-9]"))
    return "^(?:" + "|".join(parts) + ")$"


def _integer_limits(node) -> None:
    """FastAPI's OpenAPI models store limits as floats (n: maximum 16.0); on integer fields
    write them back as integers."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for v in node.values():
            _integer_limits(v)
    elif isinstance(node, list):
        for v in node:
            _integer_limits(v)
