"""The chat web page (src/spud/serve/web/) in real headless Chromium, against a scripted stub API.

The stub serves the page exactly as the real server does (`GET /` → index.html, `/static/*` →
the web folder) and answers /v1/chat/completions with a reply chosen by the last user message,
so these tests never depend on what a model happens to say.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WEB = Path(__file__).parents[2] / "src" / "spud" / "serve" / "web"

XSS_REPLY = (
    "Here is **bold** and *italic* text with `inline <b>code</b>`.\n\n"
    "<script>alert(1)</script>\n"
    '<img src=x onerror="alert(2)">\n\n'
    "```python\nprint('<script>alert(3)</script>')\n```\n"
    "Done."
)


def _need_browser():
    """Skip without Chromium on a dev box; fail in CI, where a silent skip would hide a regression."""
    reason = None
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright Python package is missing (pip install -e '.[test]')"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests need Chromium in CI: {reason}")
        pytest.skip(reason)


# ----------------------------------------------------------------------------------- servers
class ServerThread:
    """uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def mount_web(app):
    """The same routes the real API server uses for the page."""
    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")


def make_stub_app():
    app = FastAPI()
    mount_web(app)
    app.state.requests = []
    app.state.sent = {"slow": 0}

    @app.get("/v1/models")
    def models(request: Request):
        if request.headers.get("authorization") == "Bearer wrong":
            return JSONResponse({"error": {"message": "missing or invalid API key", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "owned_by": "spud"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        last = body["messages"][-1]["content"]
        if "please fail" in last:
            return JSONResponse(
                {"error": {"message": "stub says: temperature is too spicy", "type": "invalid_request_error",
                           "param": "temperature", "code": None}},
                status_code=400,
            )
        delay, error_after = 0.0, None
        if "slow" in last:
            pieces, delay = [f"tok{i} " for i in range(200)], 0.1
        elif "count" in last:
            pieces, delay = [f"n{i} " for i in range(25)], 0.12
        elif "xss" in last:
            pieces = [XSS_REPLY[i:i + 7] for i in range(0, len(XSS_REPLY), 7)]
        elif "break midway" in last:
            pieces, error_after = ["partial ", "answer "], 2
        else:
            pieces = ["Hello", " from", " the", " stub", "."]

        def chunk(delta, finish=None):
            return "data: " + json.dumps({
                "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": "stub-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }) + "\n\n"

        async def stream():
            yield chunk({"role": "assistant", "content": ""})
            for i, p in enumerate(pieces):
                if error_after is not None and i == error_after:
                    yield "data: " + json.dumps({"error": {"message": "engine fell over", "type": "server_error",
                                                           "param": None, "code": None}}) + "\n\n"
                    return
                if "slow" in last:
                    app.state.sent["slow"] += 1
                yield chunk({"content": p}, "stop" if i == len(pieces) - 1 else None)
                if delay:
                    await asyncio.sleep(delay)
            if error_after is not None:
                yield "data: " + json.dumps({"error": {"message": "engine fell over", "type": "server_error",
                                                       "param": None, "code": None}}) + "\n\n"
                return
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stub():
    _need_browser()
    app = make_stub_app()
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A fresh browser context (own localStorage) with dialog, console-error and request logs."""

    def __init__(self, browser, base_url):
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.dialogs, self.errors, self.urls = [], [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.base_url = base_url
        self.page.goto(base_url + "/")
        self.page.wait_for_selector("#prompt")

    def send(self, text):
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_idle(self):
        self.page.wait_for_selector("#send", state="visible")
        self.page.wait_for_selector("#stop", state="hidden")

    def last_reply(self) -> str:
        return self.page.inner_text(".msg.assistant .body >> nth=-1")

    def close(self):
        self.context.close()


@pytest.fixture
def ui(browser, stub):
    p = Page(browser, stub.url)
    yield p
    assert p.errors == [], f"uncaught page errors: {p.errors}"
    p.close()


# ------------------------------------------------------------------------------------- tests
def test_page_loads_offline(ui, stub):
    page = ui.page
    assert page.title() == "Spud chat"
    page.wait_for_function("document.getElementById('model-name').textContent === 'stub-model'")
    assert page.is_visible("#send") and page.is_hidden("#stop")
    assert page.is_visible("#new-chat")
    # everything the page loads comes from its own server: no CDN, fonts or analytics
    assert ui.urls and all(u.startswith(stub.url) for u in ui.urls), ui.urls


def test_send_streams_reply_incrementally(ui, stub):
    page = ui.page
    ui.send("count to 25 please")
    assert page.inner_text(".msg.user .body >> nth=-1") == "count to 25 please"
    # part of the reply is on screen while the stream is still running
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return m && m.textContent.includes('n3 '); }"
    )
    partial = ui.last_reply()
    assert "n24" not in partial and page.is_visible("#stop")
    ui.wait_idle()
    full = ui.last_reply()
    assert full.strip() == " ".join(f"n{i}" for i in range(25))
    body = stub.app.state.requests[-1]["body"]
    assert body["stream"] is True and body["model"] == "stub-model"
    assert body["messages"] == [{"role": "user", "content": "count to 25 please"}]
    # max tokens defaults to "auto": not sent, so the server fills the rest of the context
    assert "max_tokens" not in body


def test_multi_turn_and_settings_are_sent_and_persisted(ui, stub):
    page = ui.page
    page.click("#settings summary")
    page.fill("#system", "You are a potato.")
    page.fill("#temperature", "0.3")
    page.fill("#max-tokens", "42")
    page.fill("#api-key", "sk-test-123")
    ui.send("hi")
    ui.wait_idle()
    assert ui.last_reply() == "Hello from the stub."
    ui.send("and again")
    ui.wait_idle()
    req = stub.app.state.requests[-1]
    assert req["authorization"] == "Bearer sk-test-123"
    assert req["body"]["temperature"] == 0.3 and req["body"]["max_tokens"] == 42
    assert req["body"]["messages"] == [
        {"role": "system", "content": "You are a potato."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello from the stub."},
        {"role": "user", "content": "and again"},
    ]
    page.reload()
    page.wait_for_selector("#prompt")
    assert page.input_value("#system") == "You are a potato."
    assert page.input_value("#temperature") == "0.3"
    assert page.input_value("#max-tokens") == "42"
    assert page.input_value("#api-key") == "sk-test-123"


def test_stop_ends_generation_and_ui_recovers(ui, stub):
    page = ui.page
    stub.app.state.sent["slow"] = 0
    ui.send("slow story")
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
        " return m && m.textContent.includes('tok3 '); }"
    )
    page.click("#stop")
    ui.wait_idle()
    stopped = ui.last_reply()
    time.sleep(1.0)
    assert ui.last_reply() == stopped, "text kept arriving after Stop"
    assert "(stopped)" in stopped and "tok199" not in stopped
    # the server saw the client go away long before the 200-token stream would have ended
    assert stub.app.state.sent["slow"] < 100
    # and the page is usable again
    ui.send("hi after stop")
    ui.wait_idle()
    assert ui.last_reply() == "Hello from the stub."
    # the stopped partial reply is kept as history
    msgs = stub.app.state.requests[-1]["body"]["messages"]
    assert msgs[1]["role"] == "assistant" and msgs[1]["content"].startswith("tok0 tok1 tok2 tok3")


def test_reload_finds_conversation_in_list(ui):
    page = ui.page
    ui.send("remember the potato")
    ui.wait_idle()
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    ui.send("second chat")
    ui.wait_idle()
    page.reload()
    page.wait_for_selector("#conversations .conv")
    titles = page.locator("#conversations .conv-title").all_inner_texts()
    assert titles == ["second chat", "remember the potato"]  # newest first
    # the open conversation survives the reload
    assert page.inner_text(".msg.user .body") == "second chat"
    page.click("#conversations .conv-title >> text=remember the potato")
    assert page.locator(".msg.user .body").all_inner_texts() == ["remember the potato"]
    assert ui.last_reply() == "Hello from the stub."
    assert "active" in page.get_attribute(".conv >> nth=1", "class")
    # delete it: gone after another reload
    page.click(".conv.active .conv-delete")
    page.reload()
    page.wait_for_selector("#conversations .conv")
    assert page.locator("#conversations .conv-title").all_inner_texts() == ["second chat"]


def test_model_output_is_escaped_and_markdown_rendered(ui):
    page = ui.page
    ui.send('xss <img src=x onerror="alert(9)"> please')
    ui.wait_idle()
    time.sleep(0.3)
    assert ui.dialogs == []
    reply = page.locator(".msg.assistant .body >> nth=-1")
    text = reply.inner_text()
    assert "<script>alert(1)</script>" in text
    assert '<img src=x onerror="alert(2)">' in text
    assert reply.locator("script, img").count() == 0
    assert reply.locator("strong").inner_text() == "bold"
    assert reply.locator("em").inner_text() == "italic"
    assert reply.locator("p code").inner_text() == "inline <b>code</b>"
    assert reply.locator("pre code").inner_text() == "print('<script>alert(3)</script>')"
    assert reply.locator("pre code").get_attribute("class") == "language-python"
    # the user's own message is plain text too
    assert page.inner_text(".msg.user .body >> nth=-1") == 'xss <img src=x onerror="alert(9)"> please'
    assert page.locator(".msg.user img").count() == 0
    assert page.evaluate("document.querySelectorAll('#messages script, #messages img').length") == 0
    # survives a reload (rendered again from localStorage) just as safely
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert "<script>alert(1)</script>" in ui.last_reply()
    assert page.evaluate("document.querySelectorAll('#messages script, #messages img').length") == 0
    assert ui.dialogs == []


def test_markdown_renderer_cases(ui):
    def render(s):
        return ui.page.evaluate("s => window.spudChat.renderMarkdown(s)", s)

    assert render("a\nb\n\nc") == "<p>a<br>b</p><p>c</p>"
    assert render("**b** _i_ `c*d*`") == "<p><strong>b</strong> <em>i</em> <code>c*d*</code></p>"
    assert render("snake_case_name and 2*3*4") == "<p>snake_case_name and 2*3*4</p>"
    assert render("```\nunclosed <x>") == "<pre><code>unclosed &lt;x&gt;</code></pre>"
    assert render('```"><script>\nx\n```') == '<pre><code class="language-script">x</code></pre>'
    assert render("<b onclick='x'>&amp;</b>") == "<p>&lt;b onclick=&#39;x&#39;&gt;&amp;amp;&lt;/b&gt;</p>"
    assert render("\u0000" + "0" + "\u0000 `<i>`") == "<p>0 <code>&lt;i&gt;</code></p>"


def test_api_error_is_shown_once(ui):
    page = ui.page
    ui.send("please fail")
    page.wait_for_selector(".msg.error")
    ui.wait_idle()
    assert page.inner_text(".msg.error .body") == "HTTP 400 Bad Request: stub says: temperature is too spicy"
    # inline only, not also as a banner: the page holds the message exactly once
    assert page.is_hidden("#banner")
    assert page.inner_text("body").count("stub says: temperature is too spicy") == 1
    assert page.locator(".msg.assistant").count() == 0
    # the error is not sent back to the model as history, and the next message works
    ui.send("hi")
    ui.wait_idle()
    assert page.is_hidden("#banner")
    assert ui.last_reply() == "Hello from the stub."


def test_error_inside_the_stream_is_shown(ui):
    page = ui.page
    ui.send("break midway")
    page.wait_for_selector(".msg.error")
    ui.wait_idle()
    assert page.inner_text(".msg.error .body") == "engine fell over"
    assert page.is_hidden("#banner") and page.inner_text("body").count("engine fell over") == 1
    assert ui.last_reply().startswith("partial answer")


def test_wrong_api_key_is_reported(ui):
    page = ui.page
    page.click("#settings summary")
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Tab")  # the key is checked against /v1/models once edited
    page.wait_for_selector("#banner", state="visible")
    assert "401" in page.inner_text("#banner") and "API key" in page.inner_text("#banner")
    page.fill("#api-key", "")
    page.press("#api-key", "Tab")
    page.wait_for_selector("#banner", state="hidden")


def test_network_failure_is_shown(ui):
    page = ui.page
    page.route("**/v1/chat/completions", lambda route: route.abort())
    ui.send("hello?")
    page.wait_for_selector(".msg.error")
    ui.wait_idle()
    assert page.inner_text(".msg.error .body").startswith("Network error: could not reach the server")
    assert page.is_hidden("#banner") and page.inner_text("body").count("Network error") == 1
    page.unroute("**/v1/chat/completions")
    ui.send("hi")
    ui.wait_idle()
    assert ui.last_reply() == "Hello from the stub."


# ------------------------------------------------------------------------ the real server
@pytest.fixture(scope="module")
def real_server(serve_run):
    """The real API app (spud.serve.api.create_app) over a real Engine on the tiny trained run."""
    _need_browser()
    from spud.serve.api import create_app
    from spud.serve.engine import Engine

    engine = Engine.from_run(serve_run, device="cpu")
    engine.start()
    app = create_app(engine)
    if not any(getattr(r, "path", None) == "/" for r in app.routes):
        mount_web(app)  # until the API serves the page itself; then this is a no-op
    try:
        with ServerThread(app) as srv:
            srv.engine = engine
            yield srv
    finally:
        engine.shutdown(True)


def test_page_chats_with_the_real_server(browser, real_server):
    ui = Page(browser, real_server.url)
    try:
        page = ui.page
        page.wait_for_function(
            "name => document.getElementById('model-name').textContent === name", arg=real_server.engine.model_name
        )
        statuses = []
        page.on("response", lambda r: statuses.append(r.status) if "/v1/chat/completions" in r.url else None)
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "8")
        ui.send("Hello")
        ui.wait_idle()
        assert statuses == [200]
        assert page.is_hidden("#banner"), page.inner_text("#banner")
        assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.error").count() == 0
        ui.send("Tell me more")
        ui.wait_idle()
        assert statuses == [200, 200] and page.locator(".msg.assistant").count() == 2
        assert ui.dialogs == [] and ui.errors == []
    finally:
        ui.close()
