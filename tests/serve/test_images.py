"""Image content parts on /v1/chat/completions: parsing and validation (serve/images.py).

Each bad image is refused with an OpenAI-shaped 400 whose `param` is the exact field path and
whose message says what to do; a text-only model refuses images outright. The vision model end
to end (engine, usage, logits) is in test_images_e2e.py.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import openai
import pytest
from PIL import Image

from spud.serve import images
from spud.serve.images import ImageRef
from spud.serve.streaming import APIError

PARAM = "messages[1].content[2].image_url.url"


def encode(fmt: str, size=(8, 6), color=(200, 30, 40), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def refused(url: str) -> APIError:
    with pytest.raises(APIError) as e:
        images.decode_image(ImageRef(PARAM, url))
    err = e.value
    assert err.status == 400 and err.param == PARAM and err.message.startswith(PARAM + ": ")
    assert err.body()["error"]["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("fmt,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                       ("GIF", "image/gif"), ("PNG", "image/jpeg"), ("JPEG", "image/jpg")])
def test_accepted_formats_decode(fmt, media):
    # the bytes decide the format: a PNG labelled image/jpeg is still read as the PNG it is
    image = images.decode_image(ImageRef(PARAM, data_url(encode(fmt), media)))
    assert image.format == fmt and image.size == (8, 6)


def test_animated_gif_reads_the_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    image = images.decode_image(ImageRef(PARAM, data_url(buf.getvalue(), "image/gif")))
    assert image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("url,code,words", [
    ("https://example.com/cat.png", "invalid_image_url", ["offline", "data:image/png;base64,"]),
    ("HTTP://example.com/cat.png", "invalid_image_url", ["offline"]),
    ("ftp://example.com/cat.png", "invalid_image_url", ["data URL", "ftp:"]),
    ("cat.png", "invalid_image_url", ["data URL", "no URL scheme"]),
    ("data:image/png;base64" + "A" * 300, "invalid_image_url", ["malformed"]),
    ("data:image/bmp;base64,Qk0=", "invalid_image_format", ["'image/bmp'", "PNG, JPEG, WebP or GIF"]),
    ("data:text/plain;base64,aGk=", "invalid_image_format", ["'text/plain'"]),
    ("data:image/png,rawbytes", "invalid_image_url", ["base64-encoded"]),
    ("data:image/png;base64,", "invalid_image", ["empty"]),
    ("data:image/png;base64,iVBOR w0KGgo=", "invalid_image", ["not valid base64"]),
    ("data:image/png;base64,iVBORw0KGgo", "invalid_image", ["not valid base64"]),
    ("data:image/png;base64," + base64.b64encode(b"just some text, no image").decode(),
     "invalid_image_format", ["not a PNG, JPEG, WebP or GIF"]),
])
def test_bad_urls_are_400s_naming_the_field(url, code, words):
    err = refused(url)
    assert err.code == code, err.message
    for w in words:
        assert w in err.message, err.message


def test_real_image_of_an_unsupported_format_is_refused():
    err = refused(data_url(encode("BMP"), "image/png"))  # mislabelled: the bytes decide
    assert err.code == "invalid_image_format"


def test_truncated_image_is_refused():
    data = encode("PNG", size=(64, 64), color=(1, 2, 3))
    err = refused(data_url(data[: len(data) // 2]))
    assert err.code == "invalid_image" and "truncated or corrupt" in err.message


def test_byte_and_pixel_limits(monkeypatch):
    data = encode("PNG", size=(30, 20))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 599)
    err = refused(data_url(data))
    assert err.code == "image_too_large" and "30x20 = 600 pixels" in err.message and "599" in err.message
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 600)
    assert images.decode_image(ImageRef(PARAM, data_url(data))).size == (30, 20)
    # decoded bytes over the limit, URL still short enough to be read
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(data) - 1)
    err = refused(data_url(data))
    assert err.code == "image_too_large" and f"{len(data)} bytes" in err.message
    # a URL longer than any accepted image is refused before decoding
    monkeypatch.setattr(images, "MAX_URL_CHARS", 100)
    err = refused(data_url(data))
    assert err.code == "image_too_large"


@pytest.mark.parametrize("url", [
    "data:image/png;base64,iVBORw0KGgo=", "data:image/jpg;base64,AAAA", "data:image/webp;base64,",
    "data:image/gif;name=a.gif;base64,AA==", "data:image/png;charset=x;base64,AAAA",
    "data:image/PNG;base64,AAAA", "data:image/png;base64;x,AAAA", "data:image/png,AAAA",
    "data:image/bmp;base64,AAAA", "data:,AAAA", "data:image/png;base64,AA AA", "data:image/png;base64,A=A=",
    "data:image/png;base64,AAA%", "https://x/y.png", "data:image/svg+xml;base64,AAAA",
])
def test_documented_pattern_is_what_the_parser_accepts(url):
    """The OpenAPI document's pattern and the server agree (base64 padding/length aside)."""
    documented = re.match(images.DATA_URL_PATTERN, url) is not None
    try:
        payload = url[images.parse_data_url(ImageRef(PARAM, url)):]
        base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        accepted = True
    except (APIError, ValueError):
        accepted = False
    assert accepted == documented


# ------------------------------------------------------------------------- the text-only server
def _image_chat(model_name: str, url: str) -> dict:
    return {"model": model_name, "max_tokens": 2, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "text", "text": " look:"},
                                     {"type": "image_url", "image_url": {"url": url, "detail": "low"}}]}]}


def test_text_only_model_refuses_images(client, model_name):
    body = _image_chat(model_name, data_url(encode("PNG")))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    err = e.value.body
    assert err["code"] == "images_not_supported" and err["param"] == "messages[1].content[2]"
    assert "text-only" in err["message"] and "--model vlm" in err["message"]


def test_text_parts_without_images_still_work(client, model_name):
    body = _image_chat(model_name, "")
    body["messages"][1]["content"].pop()
    out = client.chat.completions.create(**body, temperature=0)
    plain = client.chat.completions.create(**{**body, "messages": [
        body["messages"][0], {"role": "user", "content": "what is this? look:"}]}, temperature=0)
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.parametrize("part,param", [
    ({"type": "audio", "audio": {}}, "messages[1].content"),
    ({"type": "image_url"}, "messages[1].content"),
    ({"type": "image_url", "image_url": {"url": "data:,", "detail": "ultra"}}, "messages[1].content"),
])
def test_malformed_parts_are_400s(http, model_name, part, param):
    body = _image_chat(model_name, "x")
    body["messages"][1]["content"][2] = part
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_refuses_images_on_a_text_only_model(http, model_name):
    body = _image_chat(model_name, data_url(encode("PNG")))
    r = http.post("/tokenize", json={"messages": body["messages"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "images_not_supported"


def test_openapi_states_the_image_rules(live):
    doc = httpx.get(live.url + "/openapi.json").json()
    url = doc["components"]["schemas"]["ImageURL"]["properties"]["url"]
    assert url["pattern"] == images.DATA_URL_PATTERN and url["maxLength"] == images.MAX_URL_CHARS
    assert "text-only" in url["description"]
    detail = doc["components"]["schemas"]["ImageURL"]["properties"]["detail"]
    assert detail["enum"] == ["auto", "low", "high"]
