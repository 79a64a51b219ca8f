"""The Jinja form of `Tokenizer.render_chat`, stored as `chat_template` in exported tokenizers
(tokenizer_config.json, GGUF) so that transformers, vLLM and llama.cpp build exactly the prompts
the model was trained on: roles and ends, tool definitions closing the system turn, assistant tool
calls after their content, tool results as wrapped user turns, and text content parts joined.
tests/export/test_hf_export.py renders conversations with transformers' apply_chat_template and
compares the ids to render_chat's.

Images have no text form here: a message with an image part raises (the VLM is not exported).
JSON is written with `tojson`, which in transformers is json.dumps(ensure_ascii=False) with the
default separators: what render_chat writes.
"""

from __future__ import annotations


def jinja_template(preamble: str, call_open: str, call_close: str, result_open: str, result_close: str) -> str:
    def lit(s: str) -> str:  # a Jinja string literal
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

    return "".join([
        # a message's text: a string, or its text parts joined
        "{%- macro body(m) -%}",
        "{%- if m['content'] is string -%}{{- m['content'] -}}",
        "{%- elif m['content'] is iterable -%}{%- for p in m['content'] -%}",
        "{%- if p['type'] == 'text' -%}{{- p['text'] -}}",
        "{%- else -%}{{- raise_exception('image content needs a vision model; this export is text-only') -}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        # one OpenAI tool call: arguments as sent (a JSON string) or dumped (a mapping)
        "{%- macro call(c) -%}",
        "{%- set f = c['function'] if c['function'] is defined else c -%}",
        "{%- set a = f['arguments'] if f['arguments'] is defined else '{}' -%}",
        "{{- ", lit(call_open + '{"name": '), " + (f['name'] | tojson) + ", lit(', "arguments": '),
        " + (a if a is string else (a | tojson)) + ", lit("}" + call_close), " -}}",
        "{%- endmacro -%}",
        "{{- bos_token -}}",
        "{%- set ns = namespace(start=0, listing='') -%}",
        "{%- if tools -%}",
        "{%- set ns.listing = ", lit(preamble), " -%}",
        "{%- for t in tools -%}",
        "{%- set f = t['function'] if t['function'] is defined else t -%}",
        "{%- set ns.listing = ns.listing + '{\"name\": ' + (f['name'] | tojson)",
        " + ((', \"description\": ' + (f['description'] | tojson)) if f['description'] is defined and f['description'] is not none else '')",
        " + ((', \"parameters\": ' + (f['parameters'] | tojson)) if f['parameters'] is defined and f['parameters'] is not none else '')",
        " + '}\\n' -%}",
        "{%- endfor -%}",
        "{%- set ns.listing = ns.listing + '</tools>' -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set first = body(messages[0]) -%}",
        "{{- '<|system|>' + ((first + '\\n\\n' + ns.listing) if (first or messages[0]['content'] is not string)",
        " else ns.listing) + '<|end|>' -}}",
        "{%- set ns.start = 1 -%}",
        "{%- else -%}{{- '<|system|>' + ns.listing + '<|end|>' -}}{%- endif -%}",
        "{%- endif -%}",
        "{%- for m in messages[ns.start:] -%}",
        "{%- set b = body(m) -%}",
        "{%- if m['role'] == 'tool' -%}",
        "{{- '<|user|>' + ", lit(result_open), " + b + ", lit(result_close), " + '<|end|>' -}}",
        "{%- elif m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] -%}",
        "{%- set ns.calls = '' -%}",
        "{%- for c in m['tool_calls'] -%}{%- set ns.calls = ns.calls + ('\\n' if not loop.first else '') + call(c) -%}{%- endfor -%}",
        "{{- '<|assistant|>' + b + ('\\n' if b else '') + ns.calls + '<|end|>' -}}",
        "{%- else -%}{{- '<|' + m['role'] + '|>' + b + '<|end|>' -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
    ])
