"""A request's images inside the serving engine.

The prompt holds `tokens_per_image` placeholder ids (`tokenizer.image_id`) per image; the model
reads the image's embeddings at those positions instead of the placeholder's token embedding
(`forward_slots(..., image_embeds=E)`, E: (placeholders in the chunk, d_model)). This object
- computes E once per request, on the engine thread when the first of the request's sequences
  is admitted (n choices share one encoder forward), under the engine's model lock;
- hands each prefill chunk the rows of E for the placeholders inside it (chunked prefill and a
  prefix-cache hit both start mid-prompt);
- gives the prefix cache a key sequence in which each placeholder is replaced by a digest of
  its image's pixels, so two prompts that differ only in their image never share KV blocks
  while a second turn about the same image reuses the first turn's blocks.
"""

from __future__ import annotations

import bisect
import hashlib
import threading

import torch

from spud.errors import SpudError


class PromptImages:
    def __init__(self, pixels: torch.Tensor, image_id: int, tokens_per_image: int) -> None:
        if pixels.dim() != 4 or pixels.shape[0] < 1 or pixels.shape[1] != 3:
            raise SpudError(f"images must be a (N, 3, H, W) tensor with N >= 1, got {tuple(pixels.shape)}")
        self.pixels = pixels
        self.image_id = int(image_id)
        self.tokens_per_image = int(tokens_per_image)
        # the model reads the preprocessed pixels, so those are what tells two images apart
        self.digests = [hashlib.blake2b(p.contiguous().numpy().tobytes(), digest_size=16).hexdigest()
                        for p in pixels.detach().cpu().float()]
        self._embeds: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def placeholders(self) -> int:
        return self.pixels.shape[0] * self.tokens_per_image

    def check(self, prompt: list[int]) -> None:
        """The prompt must hold exactly tokens_per_image placeholders per image."""
        found = sum(1 for t in prompt if t == self.image_id)
        if found != self.placeholders:
            raise SpudError(
                f"the prompt has {found} image placeholder ids but {self.pixels.shape[0]} image(s) need "
                f"{self.placeholders} ({self.tokens_per_image} each); render it with "
                f"render_chat(..., image_tokens={self.tokens_per_image})")

    def embeds(self, model) -> torch.Tensor:
        """(placeholders, d_model) in prompt order; the encoder runs once per request."""
        with self._lock:
            if self._embeds is None:
                w = model.embed.weight
                e = model.encode_images(self.pixels.to(device=w.device, dtype=w.dtype))
                self._embeds = e.reshape(-1, e.shape[-1])
            return self._embeds

    def chunk(self, model, prompt: list[int], start: int, n: int) -> torch.Tensor:
        """The rows of E for the placeholders in prompt[start:start + n]."""
        where = [i for i, t in enumerate(prompt) if t == self.image_id]
        a, b = bisect.bisect_left(where, start), bisect.bisect_left(where, start + n)
        return self.embeds(model)[a:b]

    def cache_key(self, ids: list[int]) -> list:
        """ids with the k-th placeholder replaced by "<digest of its image>/<k within the image>"."""
        out, k = [], 0
        for t in ids:
            if t == self.image_id and k < self.placeholders:
                image, pos = divmod(k, self.tokens_per_image)
                out.append(f"{self.digests[image]}/{pos}")
                k += 1
            else:
                out.append(t)
        return out


# ---------------------------------------------------------------- the engine's three hooks
def cache_ids(seq, ids: list[int]) -> list:
    """What the prefix cache keys a sequence's ids by (its prompt, maybe plus sampled tokens)."""
    images = getattr(seq, "images", None)
    return ids if images is None else images.cache_key(ids)


def chunk_inputs(seq, model, start: int, n: int) -> dict:
    """Extra forward_slots arguments for prefilling prompt[start:start + n] of a sequence."""
    images = getattr(seq, "images", None)
    if images is None:
        return {}
    rows = images.chunk(model, seq.prompt, start, n)
    return {"image_embeds": rows} if len(rows) else {}
