"""`spud export hf`: the directory loads natively in transformers, matches Spud's logits and greedy
generation for every exportable option combination, and refuses what it cannot express."""

from __future__ import annotations

import json

import pytest
import torch

from spud.errors import SpudError
from spud.export.arch import pick_arch
from spud.export.hf import export_hf
from spud.export.source import load_source
from spud.serve.sampling import generate

transformers = pytest.importorskip("transformers")

PROMPTS = ["What is 12 plus 7?", "The quick brown fox jumps over the lazy dog.",
           "def add(a, b):\n    return a + b", "Ünïcödé text — with dashes, émojis 🙂 and 1234 digits"]

# Every exportable combination of the options that change the architecture or the weight layout:
# MLP type × QK-norm × tied head, with GQA, explicit head_dim, RoPE theta and norm eps varied.
COMBOS = [
    ({"qk_norm": False}, "LlamaForCausalLM"),  # qk_norm is on by default: Llama is the opt-out
    ({"qk_norm": False, "n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0, "norm_eps": 1e-6}, "LlamaForCausalLM"),
    ({"qk_norm": True}, "Qwen3ForCausalLM"),
    ({"qk_norm": True, "n_kv_heads": 1, "tie_embeddings": False, "head_dim": 32}, "Qwen3ForCausalLM"),
    ({"mlp": "relu2", "qk_norm": False}, "ArceeForCausalLM"),
    ({"mlp": "gelu", "qk_norm": False, "tie_embeddings": False, "n_kv_heads": 2, "rope_theta": 1e6}, "ArceeForCausalLM"),
    ({"mlp": "relu2", "qk_norm": True, "n_kv_heads": 2, "tie_embeddings": False}, "ApertusForCausalLM"),
    ({"mlp": "gelu", "qk_norm": True, "head_dim": 8, "mlp_hidden": 96}, "ApertusForCausalLM"),
]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    # Greedy, and no stop ids on either side: both must produce exactly n tokens. Set on the
    # model's own generation config: transformers >= 5 lets the exported defaults (sampling)
    # win over call arguments that equal the library defaults.
    g = model.generation_config
    g.do_sample, g.eos_token_id, g.temperature, g.top_k, g.top_p = False, None, None, None, None
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kw,hf_class", COMBOS, ids=[c[1] + str(i) for i, c in enumerate(COMBOS)])
def test_export_matches_spud_logits_and_greedy_generation(run_factory, tmp_path, kw, hf_class):
    run = run_factory(**kw)
    out = tmp_path / "hf"
    summary = export_hf(run, out)
    assert summary["architecture"] == hf_class
    peer = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(peer).__name__ == hf_class
    src = load_source(run)
    torch.manual_seed(0)
    rand = torch.randint(0, src.cfg.model.vocab_size, (3, 100))
    real = [src.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    with torch.no_grad():
        diff = (peer(input_ids=rand).logits - src.model(rand)).abs().max().item()
        for ids in real:
            x = torch.tensor([ids])
            diff = max(diff, (peer(input_ids=x).logits - src.model(x)).abs().max().item())
    assert diff <= 1e-4, f"max |logit diff| {diff}"
    print(f"{hf_class} {kw}: max |logit diff| {diff:.1e}")
    for ids in real[:1]:
        mine = list(generate(src.model, ids, 64, temperature=0.0))
        assert len(mine) == 64
        assert hf_greedy(peer, ids, 64) == mine


@pytest.mark.parametrize("kw,option,closest", [
    ({"block": "parallel"}, "model.block='parallel'", "model.block='llama'"),
    ({"logit_softcap": 15.0}, "model.logit_softcap=15.0", "model.logit_softcap=null"),
])
def test_inexpressible_options_are_refused_with_the_closest_config(run_factory, tmp_path, kw, option, closest):
    run = run_factory(**kw)
    with pytest.raises(SpudError) as e:
        export_hf(run, tmp_path / "hf")
    assert option in str(e.value) and closest in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == [run]  # no temp directory left behind


def test_an_option_without_a_mapping_is_refused_by_default():
    """A ModelConfig field added later (here: a hypothetical sliding window) at a non-default
    value must be refused until arch.py maps it, never silently dropped."""
    from spud.config import ModelConfig

    class Future(ModelConfig):
        sliding_window: int | None = None

    assert pick_arch(Future(vocab_size=64)).model_type == "qwen3"  # the defaults: SwiGLU + QK-norm
    with pytest.raises(SpudError, match=r"model.sliding_window=128 .*closest exportable: model.sliding_window=None"):
        pick_arch(Future(vocab_size=64, sliding_window=128))


def test_every_unmapped_model_option_is_refused_when_set():
    """Whatever options ModelConfig has today: each one arch.py does not map, set to a valid
    non-default value, makes the export refuse and name it."""
    from pydantic import ValidationError

    from spud.config import ModelConfig
    from spud.export.arch import HANDLED, MOOT_UNLESS

    candidates = {bool: [True], int: [2, 1, 4], float: [0.5, 2.0], str: ["LG", "L"]}
    checked = []
    for name, field in ModelConfig.model_fields.items():
        if name in HANDLED or name in MOOT_UNLESS:
            continue
        default = field.get_default(call_default_factory=True)
        for v in candidates.get(type(default), []):
            try:
                cfg = ModelConfig(vocab_size=64, n_layers=4, **{name: v})
            except (ValidationError, SpudError):
                continue
            if getattr(cfg, name) == default:
                continue
            with pytest.raises(SpudError, match=rf"model\.{name}="):
                pick_arch(cfg)
            checked.append(name)
            break
    for name, (other, _) in MOOT_UNLESS.items():  # e.g. a window size without local layers: fine
        if name in ModelConfig.model_fields:
            field = ModelConfig.model_fields[name]
            assert pick_arch(ModelConfig(vocab_size=64, **{name: field.get_default() + 1}))
    print("refused:", checked)


def test_sharded_weights_load_with_an_index(run_factory, tmp_path):
    run = run_factory(tie_embeddings=False)
    out = tmp_path / "hf"
    summary = export_hf(run, out, max_shard_bytes=60_000)
    files = summary["weight_files"]
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(files)
    peer = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    src = load_source(run)
    x = torch.randint(0, 448, (1, 40))
    with torch.no_grad():
        assert (peer(input_ids=x).logits - src.model(x)).abs().max().item() <= 1e-4


def test_bf16_export(run_factory, tmp_path):
    run = run_factory(qk_norm=True)
    out = tmp_path / "hf"
    export_hf(run, out, dtype="bf16")
    peer = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert peer.model.embed_tokens.weight.dtype == torch.bfloat16
    src = load_source(run)
    ref = src.model.embed.weight.detach().to(torch.bfloat16)
    assert torch.equal(peer.model.embed_tokens.weight.detach(), ref)


def test_tokenizer_and_generation_config(run_factory, tmp_path):
    run = run_factory(chat=True)
    out = tmp_path / "hf"
    assert export_hf(run, out, which="base")["model"] == "base"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    src = load_source(run, "base")
    for p in PROMPTS:
        assert tok.encode(p, add_special_tokens=False) == src.tokenizer.encode(p)
        assert tok.decode(src.tokenizer.encode(p)) == p
    gen = json.loads((out / "generation_config.json").read_text())
    t = src.tokenizer
    assert gen["eos_token_id"][0] == t.eos_id and set(gen["eos_token_id"]) == {t.eos_id, t.end_id, t.bos_id}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (t.bos_id, t.eos_id, t.pad_id)
    out2 = tmp_path / "hf-chat"
    assert export_hf(run, out2)["model"] == "chat"  # default: the chat model when there is one
    tok2 = transformers.AutoTokenizer.from_pretrained(out2)
    assert tok2.eos_token_id == t.end_id
    assert json.loads((out2 / "generation_config.json").read_text())["eos_token_id"][0] == t.end_id


def conversations() -> list[list[dict]]:
    """Many shapes: single turn, multi-turn, with and without system prompts, empty contents,
    whitespace and newlines at the edges, non-ASCII, and content ending mid-word."""
    from spud.posttrain import builtin_chat

    convs = [list(c) for c in builtin_chat.conversations(40, 3)]
    convs += [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": " leading space"},
         {"role": "assistant", "content": "trailing newline\n"}, {"role": "user", "content": "\n\nagain?"}],
        [{"role": "user", "content": "Émile a écrit 42 lignes — «bonjour» 🙂"},
         {"role": "assistant", "content": "  two spaces"}, {"role": "user", "content": ""}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
        [{"role": "system", "content": "rules\n- one\n- two"}],
    ]
    with_system = [[{"role": "system", "content": "Answer in one line."}, *c] for c in convs[:10]]
    return convs + with_system


def test_chat_template_renders_exactly_spuds_token_ids(run_factory, tmp_path):
    run = run_factory(chat=True)
    out = tmp_path / "hf"
    export_hf(run, out, which="chat")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    spud_tok = load_source(run, "chat").tokenizer
    n = 0
    for conv in conversations():
        for gen_prompt in (False, True):
            ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen_prompt)
            if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
                ids = ids["input_ids"]
            want, _ = spud_tok.render_chat(conv, add_generation_prompt=gen_prompt)
            assert ids == want, conv
            n += 1
    assert n > 100


def test_trained_run_parity_on_real_prompts(trained_run, tmp_path):
    """A genuinely trained model (configs/tiny.yaml), its own tokenizer and data-like prompts."""
    out = tmp_path / "hf"
    export_hf(trained_run, out)
    peer = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    src = load_source(trained_run)
    prompts = ["The ", "12 + 7 = ", "def main():\n", "import os\nimport sys\n\n"]
    for p in prompts:
        ids = src.tokenizer.encode(p, add_bos=True)
        assert tok(p, add_special_tokens=False)["input_ids"] == ids[1:]
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (peer(input_ids=x).logits - src.model(x)).abs().max().item()
            assert diff <= 1e-4
            print(f"trained run, prompt {p!r}: max |logit diff| {diff:.1e}")
    ids = src.tokenizer.encode(prompts[1], add_bos=True)
    assert hf_greedy(peer, ids, 64) == list(generate(src.model, ids, 64, temperature=0.0))


def test_a_chat_run_directory_given_directly_exports_its_chat_model(run_factory, tmp_path):
    run = run_factory(chat=True)
    assert export_hf(run / "chat", tmp_path / "hf")["model"] == "chat"


def test_training_only_options_export_and_mtp_heads_are_left_out(run_factory, tmp_path):
    from spud.config import ModelConfig

    if "mtp_depth" not in ModelConfig.model_fields:
        pytest.skip("this Spud has no multi-token prediction")
    run = run_factory(mtp_depth=1, zero_init_residual=True, dropout=0.1)
    s = export_hf(run, tmp_path / "hf")
    src = load_source(run)
    assert s["dropped"] == ["mtp"] and s["params"] < src.model.num_params()
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 448, (2, 30))
    with torch.no_grad():
        assert (peer(input_ids=x).logits - src.model(x)).abs().max().item() <= 1e-4


def test_chat_template_renders_tool_conversations_exactly(run_factory, tmp_path):
    """Tools (OpenAI-shaped, as a client sends them), assistant tool calls (arguments as a JSON
    string or a mapping), tool results and text content parts: transformers' apply_chat_template
    on the exported template gives render_chat's ids (the server unwraps tools the same way)."""
    run = run_factory(chat=True)
    out = tmp_path / "hf"
    export_hf(run, out, which="chat")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    spud_tok = load_source(run, "chat").tokenizer
    calc = {"type": "function", "function": {"name": "calculator", "description": "Évalue une expression",
                                             "parameters": {"type": "object", "properties": {
                                                 "expression": {"type": "string"}}, "required": ["expression"]}}}
    bare = {"type": "function", "function": {"name": "clock"}}
    call = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*7"}'}}
    convs = [
        [{"role": "user", "content": "What is 12 times 7?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12*7?"},
         {"role": "assistant", "content": None, "tool_calls": [call]},
         {"role": "tool", "content": "84"}, {"role": "assistant", "content": "It is 84."}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "time and sum?"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": [
             call, {"type": "function", "function": {"name": "clock", "arguments": {}}}]},
         {"role": "tool", "content": "84"}, {"role": "tool", "content": "12:00"}],
        [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "joined"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
    ]
    for tools in ([calc], [calc, bare], None):
        for conv in convs:
            for gen_prompt in (False, True):
                ids = tok.apply_chat_template(conv, tools=tools, tokenize=True, add_generation_prompt=gen_prompt)
                if not isinstance(ids, list):
                    ids = ids["input_ids"]
                plain = [t["function"] for t in tools] if tools else None
                want, _ = spud_tok.render_chat(conv, add_generation_prompt=gen_prompt, tools=plain)
                assert ids == want, (tools, conv)
