"""A vision-language model served end to end: images through HTTP (the official openai client)
into the engine (encoder once per request, image embeddings sliced per prefill chunk, an
image-keyed prefix cache) and out as the same tokens the model gives when called directly."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
import torch

from spud.serve import images
from tests.serve.conftest import LiveServer
from tests.serve.tiny_vlm import TOKENS_PER_IMAGE, data_url, image_message, make_vlm, picture, vlm_engine

QUESTION = "what is this?"


@pytest.fixture(scope="module")
def vserver(serve_run):
    # a 5-token prefill chunk: the 4 placeholders of an image straddle chunk boundaries;
    # a 4-token prefix-cache block: image positions are cached and looked up
    srv = LiveServer(vlm_engine(serve_run, max_batch=4, max_queue=16, prefill_chunk=5,
                                prefix_cache_tokens=1024, prefix_block=4))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def vclient(vserver):
    return openai.OpenAI(base_url=vserver.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(serve_run):
    """The same VLM, called directly (full forward, no KV cache, no engine)."""
    model, tok = make_vlm(serve_run)

    def greedy(pngs: list[bytes], text: str, max_new: int):
        from spud.model.vision import load_image

        content = [{"type": "image"}] * len(pngs) + [{"type": "text", "text": text}]
        ids = tok.render_chat([{"role": "user", "content": content}], True, image_tokens=TOKENS_PER_IMAGE)[0]
        pixels = torch.stack([load_image(p, model.cfg.vision) for p in pngs])
        ends, out, first = {tok.end_id, tok.eos_id, tok.bos_id}, [], None
        with torch.no_grad():
            embeds = model.encode_images(pixels)
            for _ in range(max_new):
                logits = model(torch.tensor([ids + out]), image_embeds=embeds)[0, -1].float()
                first = logits.log_softmax(-1) if first is None else first
                nxt = int(logits.argmax())
                if nxt in ends:
                    return ids, out, first, True
                out.append(nxt)
        return ids, out, first, False

    greedy.tok = tok
    return greedy


def ask(client, model, pngs, max_tokens=10, **kw):
    return client.chat.completions.create(model=model, messages=[image_message(QUESTION, *pngs)],
                                          max_tokens=max_tokens, temperature=0, **kw)


def test_completion_equals_the_models_own_greedy_decode(vclient, vserver, reference):
    circle = picture("circle")
    ids, out, _first, stopped = reference([circle], QUESTION, 10)
    assert out != reference([picture("square")], QUESTION, 10)[1]  # the answer depends on the image
    r = ask(vclient, vserver.engine.model_name, [circle])
    assert r.choices[0].message.content == reference.tok.decode(out, skip_special=True)
    assert r.usage.completion_tokens == len(out) + stopped  # the end token counts
    # usage counts each image as its tokens_per_image placeholders
    assert r.usage.prompt_tokens == len(ids)
    two = ask(vclient, vserver.engine.model_name, [circle, picture("square")], max_tokens=1)
    assert two.usage.prompt_tokens == len(ids) + TOKENS_PER_IMAGE


def test_images_change_the_prompt_logits_and_the_cache_tells_them_apart(vclient, vserver, reference):
    """Same text, different image: different next-token distributions, each equal to the direct
    model's, also when the other image's prompt is already in the prefix cache."""
    name, engine = vserver.engine.model_name, vserver.engine
    firsts = {}
    for kind in ("circle", "square", "circle", "noise"):
        before = engine.stats()["prefix_cache_hit_tokens"]
        r = ask(vclient, name, [picture(kind)], max_tokens=1, logprobs=True, top_logprobs=5)
        top = [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]
        _ids, _out, ref, _ = reference([picture(kind)], QUESTION, 1)
        # the API's top 5 are the direct model's top 5 (token strings may repeat: compare values)
        assert sorted(top, reverse=True) == pytest.approx(ref.topk(5).values.tolist(), abs=1e-3)
        if kind in firsts:  # the repeated prompt was served from the cache, images included
            assert engine.stats()["prefix_cache_hit_tokens"] - before >= 8
            assert top == pytest.approx(firsts[kind], abs=1e-4)
        firsts[kind] = top
    assert max(abs(x - y) for x, y in zip(firsts["circle"], firsts["square"])) > 1e-3


def test_n_choices_encode_the_images_once(vclient, vserver, monkeypatch):
    model = vserver.engine.model
    calls = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda px: calls.append(px.shape[0]) or original(px))
    r = ask(vclient, vserver.engine.model_name, [picture("noise"), picture("circle")], max_tokens=3, n=3)
    assert len(r.choices) == 3 and calls == [2]


def test_streaming_with_an_image(vclient, vserver, reference):
    _ids, out, _first, _ = reference([picture("square")], QUESTION, 6)
    chunks = list(ask(vclient, vserver.engine.model_name, [picture("square")], max_tokens=6, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.tok.decode(out, skip_special=True)
    assert chunks[-1].usage.prompt_tokens == len(_ids)


def test_tokenize_counts_image_placeholders(vserver):
    msgs = [image_message(QUESTION, picture("circle"))]
    r = httpx.post(vserver.url + "/tokenize", json={"messages": msgs}).json()
    tok = vserver.engine.tokenizer
    assert r["tokens"].count(tok.image_id) == TOKENS_PER_IMAGE


@pytest.mark.parametrize("url,code,words", [
    ("https://example.com/cat.png", "invalid_image_url", ["offline"]),
    ("data:image/png;base64,@@@@", "invalid_image", ["base64"]),
    ("data:image/bmp;base64,Qk0=", "invalid_image_format", ["PNG, JPEG, WebP or GIF"]),
    (data_url(picture("noise")[:60]), "invalid_image", ["truncated or corrupt"]),
    (data_url(b"plain text"), "invalid_image_format", ["not a PNG"]),
])
def test_bad_images_are_400s(vclient, vserver, url, code, words):
    msg = {"role": "user", "content": [{"type": "text", "text": "see"},
                                       {"type": "image_url", "image_url": {"url": url}}]}
    with pytest.raises(openai.BadRequestError) as e:
        vclient.chat.completions.create(model=vserver.engine.model_name, messages=[msg], max_tokens=2)
    body = e.value.body
    assert body["param"] == "messages[0].content[1].image_url.url" and body["code"] == code, body
    assert all(w in body["message"] for w in words), body["message"]


def test_limits_are_400s(vclient, vserver, monkeypatch):
    name = vserver.engine.model_name
    many = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture("circle"))}}]
            * (images.MAX_IMAGES + 1)}
    with pytest.raises(openai.BadRequestError) as e:
        vclient.chat.completions.create(model=name, messages=[many], max_tokens=2)
    assert e.value.body["code"] == "too_many_images"
    assert e.value.body["param"] == f"messages[0].content[{images.MAX_IMAGES}].image_url.url"
    # an image prompt longer than the context: the usual context error, counting image tokens
    with pytest.raises(openai.BadRequestError) as e:
        ask(vclient, name, [picture("circle")] * 15)
    assert e.value.body["code"] == "context_length_exceeded"
    n = len(vserver.engine.tokenizer.render_chat([{"role": "user", "content": [{"type": "image"}] * 15 + [
        {"type": "text", "text": QUESTION}]}], True, image_tokens=TOKENS_PER_IMAGE)[0])
    assert f"the prompt is {n} tokens" in e.value.body["message"] and n > 15 * TOKENS_PER_IMAGE
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 24 * 24 - 1)
    with pytest.raises(openai.BadRequestError) as e:
        ask(vclient, name, [picture("circle", size=24)])
    assert e.value.body["code"] == "image_too_large" and "24x24" in e.value.body["message"]


def test_decoding_runs_off_the_event_loop(vclient, vserver, monkeypatch):
    """While an image decodes, the server keeps answering (here: /health)."""
    gate, entered = threading.Event(), threading.Event()
    original = images.decode_image

    def slow(ref):
        entered.set()
        assert gate.wait(30)
        return original(ref)

    monkeypatch.setattr(images, "decode_image", slow)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=ask(vclient, vserver.engine.model_name,
                                                              [picture("circle")], max_tokens=1)))
    t.start()
    try:
        assert entered.wait(30)
        t0 = time.perf_counter()
        assert httpx.get(vserver.url + "/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 5
    finally:
        gate.set()
        t.join(60)
    assert result["r"].choices[0].finish_reason in ("stop", "length")


def test_openapi_states_the_vision_models_image_rules(vserver):
    doc = httpx.get(vserver.url + "/openapi.json").json()
    url = doc["components"]["schemas"]["ImageURL"]["properties"]["url"]
    assert url["pattern"] == images.DATA_URL_PATTERN and url["maxLength"] == images.MAX_URL_CHARS
    desc = url["description"]
    assert "offline" in desc and f"{images.MAX_IMAGE_PIXELS} pixels" in desc
    assert f"as {TOKENS_PER_IMAGE} prompt tokens" in desc and "16x16" in desc


@pytest.mark.parametrize("limits", [{"prefill_chunk": None}, {"prefill_chunk": 3, "speculate": 3}])
def test_engine_api_whole_prompt_prefill_and_speculation(serve_run, reference, limits):
    """The engine called directly (submit(..., images=PromptImages)): whole-prompt prefill, and
    3-token chunks with prompt-lookup speculation, give the direct model's greedy tokens."""
    from spud.errors import SpudError
    from spud.model.vision import load_image
    from spud.serve.engine import SamplingParams
    from spud.serve.prompt_images import PromptImages

    engine = vlm_engine(serve_run, max_batch=2, **limits)
    try:
        pngs = [picture("noise"), picture("square")]
        ids, out, _first, _ = reference(pngs, QUESTION, 12)
        vision = engine.model.cfg.vision
        pics = PromptImages(torch.stack([load_image(p, vision) for p in pngs]), engine.tokenizer.image_id,
                            vision.tokens_per_image)
        _text, events, fin = engine.submit(ids, SamplingParams(max_tokens=12, temperature=0), images=pics).result()
        assert [e.token_id for e in events] == out
        if "speculate" in limits:  # the repetitive answer gives prompt lookup drafts to verify
            assert engine.stats()["spec_draft_tokens_total"] > 0
        # the prompt holds two images' placeholders, the request one image: refused at submit
        with pytest.raises(SpudError, match="8 image placeholder ids but 1 image"):
            engine.submit(ids, SamplingParams(max_tokens=1), images=PromptImages(pics.pixels[:1], pics.image_id, 4))
    finally:
        engine.shutdown(True)


def test_startup_banner_says_images_are_taken(vserver, live):
    from spud.serve.server import _banner

    assert f"each image is {TOKENS_PER_IMAGE} prompt tokens" in _banner(vserver.engine, "127.0.0.1", 8000, None)
    assert "images:" not in _banner(live.engine, "127.0.0.1", 8000, None)


def test_serve_model_vlm_loads_the_runs_vision_model(serve_run, tmp_path, reference, capsys):
    """`spud serve RUN --model vlm`: the run's VLM (RUN/vlm, what `spud vlm` leaves) is served
    and reads images; without one, the CLI says how to make it."""
    import shutil

    from spud.cli import main
    from tests.serve.tiny_vlm import save_vlm_run

    run = tmp_path / "run"
    shutil.copytree(serve_run, run)
    assert main(["serve", str(run), "--model", "vlm", "--device", "cpu"]) == 2
    assert f"spud vlm {run}" in capsys.readouterr().err
    model, tok = make_vlm(run)
    save_vlm_run(run, model, tok)
    srv = LiveServer(vlm_engine_from_run(run))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        (card,) = client.models.list().data
        assert card.id == "run-vlm" and card.model_extra["spud_model"] == "vlm"
        ids, out, _first, _ = reference([picture("circle")], QUESTION, 6)
        r = ask(client, card.id, [picture("circle")], max_tokens=6)
        assert r.choices[0].message.content == reference.tok.decode(out, skip_special=True)
        assert r.usage.prompt_tokens == len(ids)
    finally:
        srv.stop()


def vlm_engine_from_run(run):
    from spud.serve.engine import Engine

    engine = Engine.from_run(run, device="cpu", model="vlm", max_batch=2)
    engine.start()
    return engine


def test_a_vision_server_takes_bodies_over_the_text_limit(vclient, vserver, live):
    """A 1.9 MB photo-sized image: over a text server's 1 MB body limit (413 there), taken here."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(3)
    arr = torch.randint(0, 256, (800, 800, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    assert len(buf.getvalue()) > 10**6
    body = {"model": vserver.engine.model_name, "max_tokens": 1,
            "messages": [image_message(QUESTION, buf.getvalue())]}
    assert httpx.post(vserver.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    r = httpx.post(live.url + "/v1/chat/completions", json={**body, "model": live.engine.model_name}, timeout=60)
    assert r.status_code == 413
