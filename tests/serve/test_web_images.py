"""Images on the chat page (web/images.js) in real headless Chromium: attach with the file
picker, paste, remove, send as OpenAI image_url content parts, show in the conversation, keep
across a reload. Against test_web.py's scripted stub API, so nothing depends on a model; the
page against a real vision model is test_images_e2e.py's."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from tests.serve.test_web import Page, browser, stub  # noqa: F401 - fixtures used by name


def png(color=(200, 30, 40), size=(12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


@pytest.fixture
def ui(browser, stub):  # noqa: F811
    p = Page(browser, stub.url)
    yield p
    assert p.errors == [], f"uncaught page errors: {p.errors}"
    p.close()


def attach(ui, *files):
    ui.page.set_input_files("#attach-input", files=[
        {"name": name, "mimeType": mime, "buffer": data} for name, mime, data in files])


def paste(ui, data: bytes, mime="image/png"):
    ui.page.evaluate("""([b64, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "clip.png", {type: mime}));
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
    }""", [base64.b64encode(data).decode(), mime])


def last_body(stub) -> dict:
    return stub.app.state.requests[-1]["body"]


def test_attach_shows_thumbnails_sends_parts_and_shows_images(ui, stub):
    page = ui.page
    red, blue = png((220, 0, 0)), png((0, 0, 220), (5, 7))
    assert page.is_hidden("#attachments")
    attach(ui, ("red.png", "image/png", red), ("blue.png", "image/png", blue))
    page.wait_for_function("document.querySelectorAll('#attachments .thumb img').length === 2")
    assert page.is_visible("#attachments")
    assert page.get_attribute("#attachments .thumb img >> nth=0", "src") == data_url(red)
    # remove the first: only blue stays
    page.click("#attachments .thumb-remove >> nth=0")
    assert page.locator("#attachments .thumb img").count() == 1
    assert page.get_attribute("#attachments .thumb img", "src") == data_url(blue)
    attach(ui, ("red.png", "image/png", red))
    page.wait_for_function("document.querySelectorAll('#attachments .thumb img').length === 2")
    ui.send("what colours are these?")
    ui.wait_idle()
    # image parts first (the order the vision stages train on), then the text
    assert last_body(stub)["messages"] == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(blue)}},
        {"type": "image_url", "image_url": {"url": data_url(red)}},
        {"type": "text", "text": "what colours are these?"}]}]
    # the composer is empty again; the conversation shows both images and the text
    assert page.is_hidden("#attachments") and page.locator("#attachments .thumb").count() == 0
    shown = page.locator(".msg.user .gallery img")
    assert shown.count() == 2 and shown.nth(0).get_attribute("src") == data_url(blue)
    assert page.evaluate("document.querySelector('.msg.user .gallery img').naturalWidth") == 5
    assert "what colours are these?" in page.inner_text(".msg.user .body")
    assert ui.last_reply() == "Hello from the stub."
    # the next turn sends the images again as history, text-only turns as strings
    ui.send("and now?")
    ui.wait_idle()
    msgs = last_body(stub)["messages"]
    assert msgs[0]["content"][0]["image_url"]["url"] == data_url(blue)
    assert msgs[1] == {"role": "assistant", "content": "Hello from the stub."}
    assert msgs[2] == {"role": "user", "content": "and now?"}
    # saved with the conversation: still there after a reload
    page.reload()
    page.wait_for_selector(".msg.user .gallery img")
    assert page.locator(".msg.user .gallery img").count() == 2


def test_paste_an_image_and_send_it_without_text(ui, stub):
    page = ui.page
    green = png((0, 180, 0))
    paste(ui, green)
    page.wait_for_selector("#attachments .thumb img")
    assert page.get_attribute("#attachments .thumb img", "src") == data_url(green)
    page.click("#send")  # an image alone is a message
    ui.wait_idle()
    assert last_body(stub)["messages"] == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(green)}}]}]
    assert page.locator("#conversations .conv-title").all_inner_texts() == ["Image"]
    # a paste without an image file attaches nothing (the text goes into the box as usual)
    page.focus("#prompt")
    page.evaluate("""() => { const dt = new DataTransfer(); dt.setData("text/plain", "hi");
        document.getElementById("prompt").dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true})); }""")
    assert page.locator("#attachments .thumb").count() == 0


def test_non_images_are_refused_in_the_page(ui):
    page = ui.page
    attach(ui, ("notes.txt", "text/plain", b"hello"), ("pic.bmp", "image/bmp", b"BM...."))
    page.wait_for_selector("#banner", state="visible")
    assert "pic.bmp is not a PNG, JPEG, WebP or GIF image" in page.inner_text("#banner")
    assert page.locator("#attachments .thumb").count() == 0
    page.click("#send")  # nothing to send: no request, no message
    assert page.locator(".msg").count() == 0


def test_big_images_are_downscaled_before_sending(ui, stub):
    page = ui.page
    rng = random.Random(0)  # noise: a PNG that does not compress below the 1 MiB kept as is
    noise = Image.frombytes("RGB", (1600, 300), rng.randbytes(1600 * 300 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    assert len(buf.getvalue()) > 2**20
    attach(ui, ("noise.png", "image/png", buf.getvalue()))
    page.wait_for_selector("#attachments .thumb img")
    ui.send("big")
    ui.wait_idle()
    url = last_body(stub)["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (1536, 288)


# ------------------------------------------------------------------------ the real servers
@pytest.fixture(scope="module")
def vision_live(serve_run):
    from tests.serve.conftest import LiveServer
    from tests.serve.tiny_vlm import vlm_engine

    srv = LiveServer(vlm_engine(serve_run, max_batch=2))
    yield srv
    srv.stop()


def test_page_sends_an_image_to_a_real_vision_model(browser, vision_live):  # noqa: F811
    from tests.serve.tiny_vlm import picture

    ui = Page(browser, vision_live.url)
    try:
        page = ui.page
        page.wait_for_function("name => document.getElementById('model-name').textContent === name",
                               arg=vision_live.engine.model_name)
        statuses = []
        page.on("response", lambda r: statuses.append(r.status) if "/v1/chat/completions" in r.url else None)
        page.click("#settings summary")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "6")
        before = vision_live.engine.stats()["prompt_tokens_total"]
        attach(ui, ("circle.png", "image/png", picture("circle")))
        page.wait_for_selector("#attachments .thumb img")
        ui.send("what is this?")
        ui.wait_idle()
        assert statuses == [200] and page.locator(".msg.error").count() == 0
        assert page.locator(".msg.user .gallery img").count() == 1
        assert page.locator(".msg.assistant").count() == 1
        # the engine saw the image's placeholders in the prompt
        tok = vision_live.engine.tokenizer
        with_image = tok.render_chat([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                      "text": "what is this?"}]}], True, image_tokens=4)[0]
        assert vision_live.engine.stats()["prompt_tokens_total"] - before == len(with_image)
        assert ui.dialogs == [] and ui.errors == []
    finally:
        ui.close()


def test_page_shows_why_a_text_only_model_refuses_an_image(browser, live):  # noqa: F811
    ui = Page(browser, live.url)
    try:
        page = ui.page
        page.wait_for_function("document.getElementById('model-name').textContent !== ''")
        attach(ui, ("red.png", "image/png", png()))
        page.wait_for_selector("#attachments .thumb img")
        ui.send("what is this?")
        page.wait_for_selector(".msg.error")
        ui.wait_idle()
        err = page.inner_text(".msg.error .body")
        assert err.startswith("HTTP 400") and "is text-only and cannot read images" in err
        # the refused image is shown dimmed and never sent again: the chat goes on in text
        assert "refused" in page.get_attribute(".msg.user .gallery", "class")
        bodies = []
        page.on("request", lambda r: bodies.append(r.post_data_json) if "/v1/chat/completions" in r.url else None)
        page.click("#settings summary")
        page.fill("#max-tokens", "3")
        ui.send("then just text")
        ui.wait_idle()
        assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.error").count() == 1
        assert [m["content"] for m in bodies[-1]["messages"]] == ["what is this?", "then just text"]
        assert ui.errors == []
    finally:
        ui.close()
