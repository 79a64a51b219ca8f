"""Chat data for SFT: reading OpenAI-messages JSONL, the built-in generated conversations,
rendering with the chat template, the held-out split and the bad-input accounting.

A conversation becomes (ids, mask) exactly as `Tokenizer.render_chat` would make it: the mask is
1 on assistant content and its <|end|>, which is what SFT trains on. Rendering goes through
`encode_batch` (one Rust call for all message bodies) rather than one `render_chat` per
conversation, because Python-side call overhead dominates for tens of thousands of short turns;
a test pins the two to the same output.

Tool use is read in the OpenAI fine-tuning format: a line may carry "tools" (function
definitions), assistant turns may carry "tool_calls" (content then may be null) and "tool" turns
hold results. Such conversations are rendered by `Tokenizer.render_chat` itself (tools in the
system turn, calls after the content, results as user turns), the way the server renders them.

Bad lines never stop a run on their own: each is skipped (or, when it is only too long, shortened
by dropping its oldest turns) and listed with file:line in the run's sft_data.json, because one
malformed line in a million-line export should cost one example, not the job. Too many of them
means the file is not what the user thinks it is, and that is an error.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from spud.errors import SpudError
from spud.posttrain import builtin_chat
from spud.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
MAX_LISTED = 50  # bad lines listed in the summary per file; the counts are always complete


@dataclass
class Conversation:
    ids: list[int]
    mask: list[int]
    where: str  # file:line (or builtin:index): what error messages and the summary point to


@dataclass
class ChatSource:
    name: str
    weight: float
    train: list[Conversation] = field(default_factory=list)
    val: list[Conversation] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def parse_data_spec(spec: str) -> tuple[str, float]:
    """'path.jsonl[:weight]' → (path, weight). Only a trailing ':number' is a weight, so paths
    containing colons (C:\\data\\x.jsonl) still work."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
        except ValueError:
            return spec, 1.0
        if not weight > 0:
            raise SpudError(f"--data {spec!r}: the weight must be > 0")
        return head, weight
    return spec, 1.0


def is_val(messages: list[dict], val_fraction: float) -> bool:
    """Held-out by content hash: the same conversation lands in the same split on every machine
    and in every run, and duplicates cannot straddle train and val."""
    if val_fraction <= 0:
        return False
    key = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8")
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return h / 2**64 < val_fraction


def check_messages(obj) -> str | None:
    """Why a parsed line is not a usable conversation, or None if it is."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        return 'not an object with a "messages" list'
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or any(function_of(t) is None for t in tools)):
        return '"tools" must be a list of {"type": "function", "function": {"name": ...}} definitions'
    msgs = obj["messages"]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in ROLES:
            return f"message {i}: unknown role {m.get('role')!r}"
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)
                                  or any(not _call_ok(c) for c in calls)):
            return (f"message {i}: tool_calls must be a list of {{\"function\": {{\"name\": str, \"arguments\": "
                    "JSON string}} on an assistant turn")
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            return f"message {i}: content is not a string"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn"
    return None


def function_of(tool) -> dict | None:
    """A tool definition → the function the chat template lists, as the server lists it (name,
    description, parameters, in that order); None when it is not a function definition."""
    f = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
    f = f if isinstance(f, dict) else tool if isinstance(tool, dict) and "name" in tool else None
    if f is None or not isinstance(f.get("name"), str) or not f["name"]:
        return None
    return {k: f[k] for k in ("name", "description", "parameters") if f.get(k) is not None}


def _call_ok(call) -> bool:
    f = call.get("function") if isinstance(call, dict) else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        return False
    args = f.get("arguments", "{}")
    if isinstance(args, dict):
        return True
    try:
        return isinstance(args, str) and isinstance(json.loads(args), dict)
    except ValueError:
        return False


def uses_tools(messages: list[dict], tools: list | None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def render_with_tools(tok: Tokenizer, messages: list[dict], tools: list | None
                      ) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """A tool conversation as `render_many` lays out a plain one: (messages, pieces of ids, pieces
    of mask), one piece per message, from `render_chat` itself (the one template). A role id
    never occurs inside a message (the text is encoded as plain text), so each one starts a
    piece; when render_chat adds a system turn for the tool listing, so do the messages."""
    ids, mask = tok.render_chat(messages, tools=[function_of(t) for t in tools or []])
    roles = set(tok.role_ids.values())
    starts = [i for i, t in enumerate(ids) if t in roles] + [len(ids)]
    pieces = [(ids[a:b], mask[a:b]) for a, b in zip(starts, starts[1:])]
    if len(pieces) == len(messages) + 1:
        messages = [{"role": "system", "content": ""}, *messages]
    return messages, [p for p, _ in pieces], [m for _, m in pieces]


def render_many(tok: Tokenizer, convs: list[list[dict]]) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Per conversation, per message: (ids, mask) pieces, laid out as render_chat lays them out
    (role token, content, <|end|>); the leading <|bos|> is added by `join`."""
    bodies = tok.encode_batch([m["content"] for c in convs for m in c])
    out, k = [], 0
    for c in convs:
        pieces_ids, pieces_mask = [], []
        for m in c:
            body = bodies[k] + [tok.end_id]
            k += 1
            flag = 1 if m["role"] == "assistant" else 0
            pieces_ids.append([tok.role_ids[m["role"]], *body])
            pieces_mask.append([0] + [flag] * len(body))
        out.append((pieces_ids, pieces_mask))
    return out


def join(tok: Tokenizer, pieces_ids: list[list[int]], pieces_mask: list[list[int]]) -> tuple[list[int], list[int]]:
    ids, mask = [tok.bos_id], [0]
    for a, b in zip(pieces_ids, pieces_mask):
        ids += a
        mask += b
    return ids, mask


def fit_context(messages: list[dict], lengths: list[int], limit: int) -> list[int] | None:
    """Indices of the messages to keep so that 1 (bos) + their tokens <= limit: leading system
    messages always stay; the oldest other turns are dropped until it fits, and the kept part
    must start with a user turn (an answer without its question teaches nothing) and still
    contain an assistant turn. None when no such suffix exists."""
    n_sys = 0
    while n_sys < len(messages) and messages[n_sys]["role"] == "system":
        n_sys += 1
    fixed = 1 + sum(lengths[:n_sys])
    for start in range(n_sys, len(messages)):
        if start > n_sys and messages[start]["role"] != "user":
            continue
        rest = messages[start:]
        if fixed + sum(lengths[start:]) <= limit and any(m["role"] == "assistant" for m in rest):
            return list(range(n_sys)) + list(range(start, len(messages)))
    return None


class BadLines:
    def __init__(self, path: str):
        self.path, self.count, self.listed = path, 0, []

    def add(self, line: int, reason: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append({"where": f"{self.path}:{line}", "reason": reason})


def load_source(spec_path: str, weight: float, tok: Tokenizer, limit: int, val_fraction: float,
                max_bad_fraction: float, builtin_count: int, seed: int, tool_share: float = 0.0) -> ChatSource:
    """Read, check, render and split one --data entry. `limit` = tokens one packed window holds;
    `tool_share`: the share of 'builtin' conversations that offer the calculator tool."""
    blank = 0
    if spec_path == "builtin":
        records = [(i + 1, r["messages"], r.get("tools"))
                   for i, r in enumerate(builtin_chat.records(builtin_count, seed, tool_share))]
        name, bad = "builtin", BadLines("builtin")
        total = len(records)
    else:
        path = Path(spec_path)
        if not path.is_file():
            raise SpudError(f"chat data file not found: {path}")
        name, bad, records, total = str(path), BadLines(str(path)), [], 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    blank += 1  # blank lines (e.g. a trailing newline) are not records: counted apart
                    continue
                total += 1
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad.add(lineno, f"not JSON ({e.msg})")
                    continue
                reason = check_messages(obj)
                if reason:
                    bad.add(lineno, reason)
                    continue
                keys = ("role", "content", "tool_calls")
                msgs = [{k: m[k] for k in keys if k in m} for m in obj["messages"]]
                records.append((lineno, msgs, obj.get("tools")))
    src = ChatSource(name, weight)
    truncated = BadLines(name)
    plain = [r for r in records if not uses_tools(r[1], r[2])]
    rendered = iter(render_many(tok, [m for _, m, _ in plain]))
    tool_convs = tool_skipped = 0
    for lineno, msgs, tools in records:
        with_tools = uses_tools(msgs, tools)
        if with_tools:
            try:
                msgs, p_ids, p_mask = render_with_tools(tok, msgs, tools)
            except SpudError as e:  # e.g. text the tokenizer refuses (a lone surrogate escape)
                bad.add(lineno, str(e))
                continue
        else:
            p_ids, p_mask = next(rendered)
        lengths = [len(p) for p in p_ids]
        if 1 + sum(lengths) > limit:
            keep = fit_context(msgs, lengths, limit)
            if keep is None and with_tools and name == "builtin":
                # the generated tool conversations need ~250 tokens with the demo's tokenizer: a
                # model with a shorter context trains without them (counted, not a bad line)
                tool_skipped += 1
                continue
            if keep is None:
                bad.add(lineno, f"longer than the context ({1 + sum(lengths)} > {limit} tokens)")
                continue
            truncated.add(lineno, f"dropped {len(msgs) - len(keep)} oldest turns to fit {limit} tokens")
            msgs = [msgs[i] for i in keep]
            p_ids, p_mask = [p_ids[i] for i in keep], [p_mask[i] for i in keep]
        ids, mask = join(tok, p_ids, p_mask)
        conv = Conversation(ids, mask, f"{name}:{lineno}")
        tool_convs += with_tools
        (src.val if is_val(msgs, val_fraction) else src.train).append(conv)
    if total == 0:
        raise SpudError(f"{name}: no conversations (empty file?)")
    if bad.count / total > max_bad_fraction:
        first = "\n  ".join(f"{b['where']}: {b['reason']}" for b in bad.listed[:5])
        raise SpudError(
            f"{name}: {bad.count} of {total} lines are bad ({bad.count / total:.1%} > "
            f"sft.max_bad_fraction={max_bad_fraction}); first bad lines:\n  {first}"
        )
    if not src.train:
        raise SpudError(f"{name}: no training conversations left after the held-out split")
    src.summary = {
        "source": name, "weight": weight, "lines": total, "blank_lines": blank,
        "train_conversations": len(src.train), "val_conversations": len(src.val),
        "train_tokens": sum(len(c.ids) for c in src.train),
        "assistant_tokens": sum(sum(c.mask) for c in src.train),
        "bad": bad.count, "bad_lines": bad.listed,
        "truncated": truncated.count, "truncated_lines": truncated.listed,
        "tool_conversations": tool_convs, "tool_conversations_too_long": tool_skipped,
    }
    return src


def load_chat_data(specs: list[str], tok: Tokenizer, limit: int, val_fraction: float,
                   max_bad_fraction: float, builtin_count: int, seed: int,
                   tool_share: float = 0.0) -> list[ChatSource]:
    if not specs:
        raise SpudError("no chat data: give --data FILE.jsonl[:weight] (or --data builtin)")
    return [load_source(*parse_data_spec(s), tok, limit, val_fraction, max_bad_fraction, builtin_count, seed,
                        tool_share)
            for s in specs]


def epoch_conversations(sources: list[ChatSource], seed: int, epoch: int) -> list[Conversation]:
    """One epoch's training conversations in order. Weights are shares of the epoch: a source of
    weight w gets w / sum(w) of the epoch's conversations (as many as all sources hold together),
    cycling through its own shuffled list when that is more than it has, so a small file can be
    upweighted and a big one downsampled. Depends only on (seed, epoch): that is what makes the
    loader's position a pair of integers."""
    rng = random.Random(f"spud-sft/{seed}/{epoch}")
    total = sum(len(s.train) for s in sources)
    wsum = sum(s.weight for s in sources)
    out: list[Conversation] = []
    for s in sources:
        n = max(1, round(total * s.weight / wsum))
        order = list(range(len(s.train)))
        rng.shuffle(order)
        out += [s.train[order[i % len(order)]] for i in range(n)]
    rng.shuffle(out)
    return out
