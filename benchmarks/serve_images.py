"""What an image costs the server: decoding + preprocessing per image, and time to first token
of a chat with an image vs the same chat without, through HTTP.

1. decode: serve/images.decode_image + spud.model.vision.load_image (what a worker thread does per
   image part) on synthetic photo-like images of a few sizes and formats; median of --repeat.
2. ttft (with RUN): RUN's base model given the default vision tower (random weights: the cost does
   not depend on them), served by a real uvicorn server; streamed chat requests alternate with
   and without a 1024x768 JPEG; median time to the first streamed chunk of each.
Prints tables and writes JSON.

    python benchmarks/serve_images.py [RUN] [--repeat 5] [--rounds 10]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import statistics
import threading
import time
from pathlib import Path

SIZES = [((1024, 768), "JPEG"), ((4032, 3024), "JPEG"), ((1024, 768), "PNG")]


def photo(w: int, h: int, fmt: str, seed: int = 0) -> bytes:
    """Smooth colour regions plus fine detail, roughly what a photo compresses like."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.frombytes("RGB", (w // 8, h // 8), rng.randbytes(w // 8 * h // 8 * 3))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def data_url(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()


def bench_decode(repeat: int) -> list[dict]:
    from spud.config import VisionConfig
    from spud.model.vision import load_image
    from spud.serve import images

    rows = []
    for (w, h), fmt in SIZES:
        data = photo(w, h, fmt)
        ref = images.ImageRef("bench", data_url(data, fmt))
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            load_image(images.decode_image(ref), VisionConfig())
            times.append(time.perf_counter() - t)
        rows.append({"image": f"{w}x{h} {fmt}", "mb": len(data) / 1e6, "ms": 1000 * statistics.median(times)})
    return rows


def bench_ttft(run: Path, rounds: int) -> dict:
    import httpx
    import torch

    from spud.config import VisionConfig
    from spud.model.vision import add_vision
    from spud.runs import choose_model, load_choice
    from spud.serve.engine import Engine
    from spud.serve.server import build_server

    model, tok, _ = load_choice(choose_model(run, "base", None), "cpu")
    tok = tok.with_image_token()
    torch.manual_seed(0)
    vlm = add_vision(model, VisionConfig(), tok.image_id).eval()
    engine = Engine(vlm, tok, model_name="bench-vlm", max_batch=4)
    engine.start()
    server = build_server(engine, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = data_url(photo(1024, 768, "JPEG"), "JPEG")
    text = {"type": "text", "text": "What is in the picture?"}
    kinds = {"text only": [text], "one image": [{"type": "image_url", "image_url": {"url": url}}, text]}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for r in range(rounds + 1):  # round 0 warms up
                for kind, content in kinds.items():
                    body = {"model": "bench-vlm", "stream": True, "max_tokens": 4, "temperature": 0,
                            "messages": [{"role": "user", "content": content}]}
                    t = time.perf_counter()
                    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                        resp.raise_for_status()
                        for line in resp.iter_lines():
                            if line.startswith("data:") and '"content":""' not in line:
                                break  # the first chunk with generated text
                    if r:
                        times[kind].append(time.perf_counter() - t)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    return {"tokens_per_image": vlm.cfg.vision.tokens_per_image,
            "ttft_ms": {k: 1000 * statistics.median(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="a run directory (its base model) for the TTFT part")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_images.json"))
    args = ap.parse_args()

    out = {"decode": bench_decode(args.repeat)}
    print(f"{'image':<18} {'MB':>6} {'decode+preprocess ms':>22}")
    for row in out["decode"]:
        print(f"{row['image']:<18} {row['mb']:>6.2f} {row['ms']:>22.0f}")
    if args.run is not None:
        out["ttft"] = bench_ttft(args.run, args.rounds)
        print(f"\nTTFT through HTTP, median of {args.rounds} (an image is "
              f"{out['ttft']['tokens_per_image']} prompt tokens):")
        for kind, ms in out["ttft"]["ttft_ms"].items():
            print(f"  {kind:<10} {ms:8.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
