"""Images in chat requests: OpenAI `image_url` content parts, checked and decoded for the model.

A chat message's content may mix `{"type": "text", "text": ...}` and `{"type": "image_url",
"image_url": {"url": "data:image/png;base64,...", "detail": "auto"}}` parts (OpenAI's shape).
This module
- finds a request's image parts and names each by its field path
  (`messages[1].content[0].image_url.url`), so every error points at the exact field;
- refuses, before decoding anything, what the server cannot take: images for a text-only
  model, remote URLs (the server is offline and fetches nothing, so an http(s) URL is a 400
  telling the client to inline the image), other schemes, media types other than PNG, JPEG,
  WebP and GIF, more than MAX_IMAGES images, URLs longer than the byte limit allows;
- decodes each image (strict base64, then Pillow: the format, the pixel count read from the
  header before any pixel is decompressed, then the pixels) in a worker thread, because a
  20 MB image takes long enough to stall every stream if decoded on the event loop, and turns
  it into the model's input with THE preprocessing function, spud.model.vision.load_image;
- writes these limits into the server's OpenAPI document.
The declared media type only has to be one of the four: the bytes decide the format (clients
often label a PNG as image/jpeg). An animated GIF is read as its first frame. `detail` is
accepted and ignored: the model sees every image at its one input size.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from spud.errors import SpudError
from spud.model import vision as model_vision
from spud.serve.streaming import APIError

MAX_IMAGES = 16  # per request: each costs an encoder forward and tokens_per_image of context
# per image: the limits of THE image loader (spud.model.vision), which training data meets too
MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS = model_vision.MAX_IMAGE_BYTES, model_vision.MAX_IMAGE_PIXELS
VISION_BODY_BYTES = 50 * 2**20  # request body limit of a server whose model takes images
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # Pillow's names
MEDIA_TYPES = ("png", "jpeg", "jpg", "webp", "gif")  # image/<type> in the data URL
_HEADER_CHARS = 256  # "data:image/png;base64," plus room for parameters (;name=value)
MAX_URL_CHARS = _HEADER_CHARS + 4 * -(-MAX_IMAGE_BYTES // 3)
# What the server accepts, as the OpenAPI document states it (ECMA-262 syntax; tests check
# that the parser below accepts exactly the URLs this matches, payload decoding aside).
DATA_URL_PATTERN = r"^data:image/(png|jpeg|jpg|webp|gif)(;[^;,]*)*;base64,[A-Za-z0-9+/]*={0,2}$"
_HEADER = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),")


@dataclass
class ImageRef:
    """One image part of a request: where it is (for errors) and its URL."""

    param: str  # e.g. messages[1].content[0].image_url.url
    url: str


def find_images(messages) -> list[ImageRef]:
    """The image parts of a chat request, in prompt order."""
    refs = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type == "image_url":
                    refs.append(ImageRef(f"messages[{i}].content[{j}].image_url.url", part.image_url.url))
    return refs


def template_content(message) -> str | list[dict]:
    """A message's content as the chat template takes it: a string when it has no image (so
    text-only chats render exactly as before), else its parts in order with each image as
    {"type": "image"} (the template writes the model's placeholder ids there)."""
    if not isinstance(message.content, list) or all(p.type == "text" for p in message.content):
        return message.text()
    return [{"type": "text", "text": p.text} if p.type == "text" else {"type": "image"}
            for p in message.content]


def vision_of(engine):
    """The served model's VisionConfig, or None when it cannot take images (no vision tower, or
    a tokenizer without the <|image|> placeholder)."""
    model = getattr(engine, "model", None)
    vision = getattr(getattr(model, "cfg", None), "vision", None)
    if vision is None or getattr(engine.tokenizer, "image_id", None) is None:
        return None
    return vision


def check_request(refs: list[ImageRef], engine) -> None:
    """The checks that need no decoding (cheap: they run on the event loop)."""
    if not refs:
        return
    if vision_of(engine) is None:
        part = refs[0].param.removesuffix(".image_url.url")
        raise APIError(400, f"{part}: the model {engine.model_name!r} is text-only and cannot read images; "
                       "send text only, or serve a vision model (`spud vlm RUN`, then "
                       "`spud serve RUN --model vlm`)", param=part, code="images_not_supported")
    if len(refs) > MAX_IMAGES:
        raise APIError(400, f"{refs[MAX_IMAGES].param}: this request has {len(refs)} images; at most "
                       f"{MAX_IMAGES} are accepted per request", param=refs[MAX_IMAGES].param,
                       code="too_many_images")
    for ref in refs:
        parse_data_url(ref)


def _bad(ref: ImageRef, message: str, code: str = "invalid_image_url") -> APIError:
    return APIError(400, f"{ref.param}: {message}", param=ref.param, code=code)


def parse_data_url(ref: ImageRef) -> int:
    """→ where the base64 payload starts in a data URL the server accepts; an APIError saying
    what is wrong otherwise. Nothing is decoded or copied here (it runs on the event loop)."""
    url = ref.url
    scheme = url[:16].split(":", 1)[0].lower() if ":" in url[:16] else ""  # (never copy the payload)
    if scheme in ("http", "https"):
        raise _bad(ref, "remote image URLs are not supported: this server is offline and fetches nothing; "
                   "send the image inline as a data URL (data:image/png;base64,<base64 bytes>)")
    if not url.startswith("data:"):
        got = f"a {scheme}: URL" if scheme else "no URL scheme"
        raise _bad(ref, f"expected a data URL (data:image/png;base64,<base64 bytes>), got {got}")
    head = _HEADER.match(url, 0, _HEADER_CHARS)
    if head is None:
        raise _bad(ref, "malformed data URL: expected data:image/<type>;base64,<base64 bytes> "
                   f"(no ',' in the first {_HEADER_CHARS} characters)")
    media, params = head.group(1), head.group(2).split(";")[1:]
    kind = media.removeprefix("image/") if media.startswith("image/") else None
    if kind not in MEDIA_TYPES:
        raise _bad(ref, f"unsupported media type {media or '(none)'!r}: send a PNG, JPEG, WebP or GIF image "
                   "(image/png, image/jpeg, image/webp, image/gif)", code="invalid_image_format")
    if not params or params[-1] != "base64":
        raise _bad(ref, "the data URL must be base64-encoded: data:image/<type>;base64,<base64 bytes>")
    if len(url) > MAX_URL_CHARS:
        raise _bad(ref, f"the image is about {(len(url) - head.end()) * 3 // 4} bytes; images are limited "
                   f"to {MAX_IMAGE_BYTES} bytes ({MAX_IMAGE_BYTES // 2**20} MiB)", code="image_too_large")
    return head.end()


def decode_image(ref: ImageRef):
    """The checked, fully decoded PIL image of one image part (blocking: call it off the loop)."""
    from PIL import Image, UnidentifiedImageError

    try:  # strict: standard alphabet, padding, no whitespace (the documented pattern)
        data = base64.b64decode(ref.url[parse_data_url(ref):], validate=True)
    except binascii.Error as e:
        raise _bad(ref, "the data URL's payload is not valid base64 (standard alphabet, = padding, "
                   f"no whitespace: {e})", code="invalid_image") from None
    if not data:
        raise _bad(ref, "the image is empty (no bytes after 'base64,')", code="invalid_image")
    if len(data) > MAX_IMAGE_BYTES:
        raise _bad(ref, f"the image is {len(data)} bytes; images are limited to {MAX_IMAGE_BYTES} bytes "
                   f"({MAX_IMAGE_BYTES // 2**20} MiB)", code="image_too_large")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise _bad(ref, "the bytes are not a PNG, JPEG, WebP or GIF image", code="invalid_image_format") from None
    except Exception as e:  # noqa: BLE001 - a header Pillow cannot parse is the client's bad input
        raise _bad(ref, f"the image cannot be read ({type(e).__name__}: {e})", code="invalid_image") from None
    w, h = image.size
    if w * h > MAX_IMAGE_PIXELS:
        raise _bad(ref, f"the image is {w}x{h} = {w * h} pixels; at most {MAX_IMAGE_PIXELS} pixels are "
                   "accepted; downscale it", code="image_too_large")
    if w < 1 or h < 1:
        raise _bad(ref, f"the image is {w}x{h} pixels: it has no pixels", code="invalid_image")
    try:  # truncated / corrupt data only shows when the pixels are decompressed
        image.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise _bad(ref, f"the {image.format} image cannot be decoded (truncated or corrupt: "
                   f"{type(e).__name__}: {e})", code="invalid_image") from None
    return image


def load_pixels(refs: list[ImageRef], vision):
    """Decode every image and preprocess it for the model → (N, 3, H, W) float tensor.
    Blocking (a worker thread calls it). One image at a time, so at most one full-size
    decoded image is held at once."""
    import torch

    out = []
    for ref in refs:
        image = decode_image(ref)
        try:
            out.append(model_vision.load_image(image, vision))
        except SpudError as e:
            raise _bad(ref, str(e), code="invalid_image") from None
        finally:
            image.close()
    return torch.stack(out)


def load_images(refs: list[ImageRef], engine):
    """The request's images as the engine takes them (a PromptImages). Blocking."""
    from spud.serve.prompt_images import PromptImages

    vision = vision_of(engine)
    return PromptImages(load_pixels(refs, vision), engine.tokenizer.image_id, vision.tokens_per_image)


# ------------------------------------------------------------------------------ OpenAPI
def openapi_images(doc: dict, engine) -> dict:
    """Write what this server does with images into its OpenAPI document, in place of
    protocol.IMAGE_URL's marker on image_url.url (idempotent: the document is cached)."""
    from spud.serve.protocol import IMAGE_URL

    vision = vision_of(engine)
    for node in _walk(doc):
        if not node.pop(IMAGE_URL, False):
            continue
        node.update(pattern=DATA_URL_PATTERN, maxLength=MAX_URL_CHARS)
        if vision is None:
            node["description"] = ("This server's model is text-only: a request with an image part is "
                                   "refused (400, code images_not_supported).")
        else:
            node["description"] = (
                "The image inline as a base64 data URL (data:image/png;base64,...); remote http(s) URLs "
                f"are refused: the server is offline. PNG, JPEG, WebP or GIF (its first frame), at most "
                f"{MAX_IMAGE_BYTES} bytes and {MAX_IMAGE_PIXELS} pixels per image, at most {MAX_IMAGES} "
                f"images per request. The model sees each image resized to {vision.image_size}x"
                f"{vision.image_size} pixels as {vision.tokens_per_image} prompt tokens (counted in "
                "usage.prompt_tokens).")
    return doc


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in list(node.values()):
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
