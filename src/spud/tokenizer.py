"""Byte-level BPE tokenizer (trained and run by the `tokenizers` library) plus the chat template.

Byte-level means every Unicode string maps to bytes first, so decode(encode(s)) == s for any
input and there is no unknown token. Digits are split one per token before BPE: tiny models learn
arithmetic far faster when "1234" is always four digit tokens than when the merges are arbitrary.
The saved `tokenizer.json` is the library's own format, so it loads unchanged with
`tokenizers.Tokenizer.from_file` and `transformers.PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from spud.config import TokenizerConfig
from spud.errors import SpudError
from spud.chat_jinja import jinja_template

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The image placeholder of vision-language runs: not in SPECIAL_TOKENS (a text tokenizer's ids
# stay as they are); `with_image_token` appends it, so every existing id keeps its meaning. An
# image in a chat renders as `image_tokens` consecutive IMAGE ids (spud.model.vision).
IMAGE = "<|image|>"
IMAGE_PART_TYPES = ("image", "image_url")
# Tool use is written as plain text inside the existing turns, so that adding it needed no new
# special tokens (every tokenizer already trained keeps working): the tool definitions close the
# system turn, an assistant's calls follow its content, and a tool's result is a user turn
# wrapped in TOOL_RESULT_OPEN/CLOSE (the layout Qwen2.5 and Hermes use). JSON is json.dumps'
# (ensure_ascii=False, default separators), which is what Jinja's `tojson` writes too.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = (
    "You can call these tools. To call one, reply with "
    + TOOL_CALL_OPEN + '{"name": <tool name>, "arguments": <arguments as a JSON object>}' + TOOL_CALL_CLOSE
    + ".\n<tools>\n"
)

# GPT-4-style split, except numbers: one digit per pre-token (see module docstring).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Longer id lists are decoded through the batch call, which releases the GIL; shorter ones (the
# serving engine decodes a few ids per generated token) skip its extra cost.
LONG_DECODE = 4096

# Jinja version of `render_chat` (chat_jinja.py), stored in tokenizer_config.json and GGUF.
CHAT_TEMPLATE = jinja_template(TOOLS_PREAMBLE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE)


class Tokenizer:
    """Thin wrapper: ids of special tokens, batch encoding, chat rendering, hashing.

    Control tokens come only from the template. `encode`/`encode_batch` treat their input as
    plain text, always: a document, chat message or prompt that contains the string "<|end|>"
    is encoded as the characters "<", "|", "end", ... and never as the <|end|> id, so nobody can
    forge a role boundary or end a training document by typing it. Only `render_chat` (role
    and end markers) and the explicit `add_bos=True` insert control ids.
    """

    def __init__(self, tok: HFTokenizer):
        # The `tokenizers` library matches added tokens inside input text even with
        # add_special_tokens=False; this switch turns that off for every encode call on this
        # object. It is runtime state, not saved in tokenizer.json, so Hugging Face users of the
        # saved file (whose Jinja chat template renders the markers as text) are unaffected.
        tok.encode_special_tokens = True
        self._tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise SpudError(f"tokenizer lacks special tokens {missing}; retrain it with spud")
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)
        self.end_id = tok.token_to_id(END)
        self.role_ids = {r: tok.token_to_id(t) for r, t in ROLE_TOKENS.items()}
        self.special_ids = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
        self.image_id: int | None = tok.token_to_id(IMAGE)  # None: a text-only tokenizer
        if self.image_id is not None:
            self.special_ids.add(self.image_id)

    def with_image_token(self) -> Tokenizer:
        """This tokenizer with the <|image|> placeholder appended (a new object; `self` when it
        already has one). Ids of existing tokens are unchanged; image_id is the old vocab_size."""
        if self.image_id is not None:
            return self
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.add_special_tokens([IMAGE])
        return Tokenizer(tok)

    # ------------------------------------------------------------------ load / save / identity
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        p = Path(path)
        if not p.is_file():
            raise SpudError(f"tokenizer not found: {p} (run `spud tokenizer train` or `spud data build`)")
        try:
            return cls(HFTokenizer.from_file(str(p)))
        except Exception as e:  # the Rust side raises plain Exception on malformed JSON
            raise SpudError(f"{p}: not a valid tokenizer.json ({e})") from None

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, plus tokenizer_config.json so transformers picks up the specials
        and the chat template. Written to a temp name and renamed: never a half-written file."""
        p = Path(path)
        tmp = p.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        tmp.replace(p)
        hf_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END]
                                         + ([IMAGE] if self.image_id is not None else []),
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        (p.parent / "tokenizer_config.json").write_text(json.dumps(hf_cfg, indent=2))

    def sha256(self) -> str:
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    # ------------------------------------------------------------------------------ encoding
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Plain text → ids, never containing a control id; BOS/EOS only when asked for."""
        try:
            (ids,) = self._encode_many([text])
        except SpudError as e:
            raise SpudError(str(e).removeprefix("text 0: ")) from None
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain texts → ids (as `encode`), in parallel on the Rust side (all cores unless
        RAYON_NUM_THREADS is set)."""
        return self._encode_many(list(texts))

    def _encode_many(self, texts: list) -> list[list[int]]:
        # Always the library's batch call, also for one text: the single-text `encode` holds
        # Python's GIL for its whole run (seconds for a 1 MB prompt), so a server thread doing it
        # stalls the event loop; the batch calls release it. `encode_batch_fast` (newer
        # `tokenizers`) also skips computing character offsets, which nothing here uses.
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            return [e.ids for e in batch(texts, add_special_tokens=False)]
        except TypeError:
            i = next((i for i, t in enumerate(texts) if not _encodable(t)), None)
            raise SpudError(f"text {i}: {_bad_text(texts[i])}" if i is not None else
                            "encode_batch: every text must be a str") from None

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = list(ids)
        if len(ids) > LONG_DECODE:  # the batch call releases the GIL (see _encode_many)
            return self._tok.decode_batch([ids], skip_special_tokens=skip_special)[0]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---------------------------------------------------------------------------------- chat
    def byte_lengths(self, size: int) -> list[int]:
        """UTF-8 bytes each token id stands for, padded to `size` ids (the model's vocabulary may be
        rounded up). In byte-level BPE one symbol is one byte, so it is the token string's length;
        special tokens and padding ids stand for no text (0 bytes). Bits-per-byte everywhere
        (training validation, eval) divides by these counts, so they live with the tokenizer."""
        out = [0] * size
        for i in range(self.vocab_size):
            if i not in self.special_ids:
                out[i] = len(self.id_to_token(i) or "")
        return out

    def render_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False,
        tools: Sequence[dict] | None = None, image_tokens: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """messages → (ids, assistant_mask). The mask is 1 on assistant content and its <|end|>
        (what SFT trains on: the model must learn to stop), 0 elsewhere.

        Tool use (see TOOL_CALL_OPEN): `tools` are function definitions ({"name", "description",
        "parameters"}), listed at the end of the system turn (one is added when the messages
        have none); an assistant message may carry OpenAI-style `tool_calls`; a "tool" message
        is its result. Without tools and tool messages the output is unchanged.

        Images: a message's content may be a list of OpenAI-style parts, {"type": "text",
        "text": ...} and {"type": "image"} / {"type": "image_url", ...}; each image renders as
        `image_tokens` <|image|> ids (the model's tokens_per_image; mask 0), in the order
        `chat_images` lists them. Text parts are joined (no separator) between images."""
        messages = list(messages)
        if tools:
            listing = TOOLS_PREAMBLE + "".join(
                json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + "</tools>"
            first = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
            if isinstance(first, str):
                messages[0] = {**messages[0], "content": first + "\n\n" + listing if first else listing}
            elif isinstance(first, list):  # content parts: the listing is one more text part
                messages[0] = {**messages[0], "content": [*first, {"type": "text", "text": "\n\n" + listing}]}
            else:
                messages.insert(0, {"role": "system", "content": listing})
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in self.role_ids and role != "tool":
                raise SpudError(
                    f"message {i}: unknown role {role!r}; expected one of {sorted([*self.role_ids, 'tool'])}"
                )
            calls = (m.get("tool_calls") or []) if role == "assistant" else []
            if content is None and calls:
                content = ""
            # segments: text runs, and None for each image
            segments = [content] if isinstance(content, str) else _segments(content, i)
            if role == "tool":
                role, segments = "user", [TOOL_RESULT_OPEN, *segments, TOOL_RESULT_CLOSE]
            if calls:
                text = "\n".join(_tool_call_text(c, i) for c in calls)
                segments += [("\n" if any(segments) else "") + text]
            try:  # plain text: markers typed into a message stay characters (see class doc)
                body = self._encode_segments(segments, image_tokens) + [self.end_id]
            except SpudError as e:
                raise SpudError(f"message {i}: {e}") from None
            flag = 1 if role == "assistant" else 0
            ids += [self.role_ids[role], *body]
            # image placeholders are inputs, never targets (only templates make the image id)
            mask += [0] + [0 if t == self.image_id else flag for t in body]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask


    def _encode_segments(self, segments: list[str | None], image_tokens: int | None) -> list[int]:
        """Text runs (adjacent ones joined) encoded as plain text; each None → image ids."""
        runs: list[str | None] = []
        for seg in segments:
            if seg is not None and runs and runs[-1] is not None:
                runs[-1] += seg
            else:
                runs.append(seg)
        if None in runs:
            if self.image_id is None:
                raise SpudError(f"an image part needs the {IMAGE} token, which this tokenizer lacks "
                                "(a text-only run; `spud vlm` adds it)")
            if not image_tokens or image_tokens < 1:
                raise SpudError("an image part needs image_tokens (the model's "
                                "model.vision.tokens_per_image)")
        ids: list[int] = []
        for run in runs:
            ids += [self.image_id] * image_tokens if run is None else self.encode(run)
        return ids


def _segments(content, i: int) -> list[str | None]:
    """A list of content parts → text strings and None (an image); clear errors otherwise."""
    if not isinstance(content, list):
        raise SpudError(f"message {i}: 'content' must be a string or a list of parts, got "
                        f"{type(content).__name__}")
    out: list[str | None] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind in IMAGE_PART_TYPES:
            out.append(None)
        else:
            raise SpudError(f"message {i}: content part {j} must be {{'type': 'text', 'text': str}} "
                            f"or an image ({' / '.join(IMAGE_PART_TYPES)}), got {part!r:.80}")
    return out


def chat_images(messages: Sequence[dict]) -> list[dict]:
    """The image parts of `messages`, in the order render_chat places their placeholders (so
    image k's embeddings fill the k-th run of image_tokens <|image|> ids)."""
    return [p for m in messages if isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES]


def _tool_call_text(call: dict, i: int) -> str:
    """An OpenAI tool call ({"function": {"name", "arguments"}}) as the template writes it. The
    arguments go in as the client sent them (a JSON string, usually what this model generated)."""
    f = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise SpudError(f"message {i}: a tool call needs function.name")
    args = f.get("arguments", "{}")
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    name = json.dumps(f["name"], ensure_ascii=False)
    return TOOL_CALL_OPEN + '{"name": ' + name + ', "arguments": ' + args + "}" + TOOL_CALL_CLOSE


def _encodable(text) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _bad_text(text) -> str:
    """Why the tokenizer refused `text`: a non-string, or a lone UTF-16 surrogate (JSON's
    "\\ud800" escape, or undecodable bytes smuggled in by Python's surrogateescape)."""
    if not isinstance(text, str):
        return f"expected text (str), got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"text contains a lone surrogate {text[e.start]!r} at character {e.start}, which is "
                "not valid Unicode; send valid UTF-8 text")
    return "the tokenizer could not encode this text"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train byte-level BPE on `texts` (an iterator: the corpus sample is streamed, not held)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)
