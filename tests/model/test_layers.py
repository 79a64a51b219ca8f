import pytest
import torch
import torch.nn.functional as F

from spud.errors import SpudError
from spud.model.layers import Attention, RMSNorm, Rotary, linear_cross_entropy
from spud.model.mlp import GELU, ReLU2, SwiGLU
from spud.model.registry import choices


def test_rmsnorm_matches_definition():
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def _rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat((-x2, x1), -1)


def test_rotary_matches_half_rotation_convention():
    hd, theta = 16, 500.0
    rot = Rotary(hd, 32, theta)
    x = torch.randn(2, 10, 3, hd)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).double() / hd)
    ang = torch.outer(torch.arange(10).double(), inv)
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos().float()[:, None], emb.sin().float()[:, None]
    torch.testing.assert_close(rot(x), x * cos + _rotate_half(x) * sin)


def test_rotary_offset_and_norm_preservation():
    rot = Rotary(8, 32, 10000.0)
    x = torch.randn(1, 12, 2, 8)
    full = rot(x)
    torch.testing.assert_close(rot(x[:, 7:], offset=7), full[:, 7:])
    torch.testing.assert_close(full.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rotary_past_max_seq_len_is_a_spud_error():
    rot = Rotary(8, 16, 10000.0)
    with pytest.raises(SpudError, match="max_seq_len"):
        rot(torch.randn(1, 4, 1, 8), offset=14)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_grouped_kv_equals_mha_with_repeated_heads(tiny, n_kv):
    """GQA/MQA must equal MHA whose k/v heads are copies of the shared ones."""
    cfg = tiny(n_kv_heads=n_kv)
    gqa = Attention(cfg)
    mha = Attention(tiny())
    h, hd, g = cfg.n_heads, cfg.dim_head, cfg.n_heads // n_kv
    w = gqa.qkv.weight.detach()
    q, k, v = w.split((h * hd, n_kv * hd, n_kv * hd))

    def rep(t):  # (n_kv·hd, d) -> (h·hd, d), each kv head repeated for its query group
        return t.view(n_kv, 1, hd, -1).expand(n_kv, g, hd, t.shape[-1]).reshape(h * hd, -1)

    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat((q, rep(k), rep(v))))
        mha.proj.weight.copy_(gqa.proj.weight)
    rot = Rotary(hd, cfg.max_seq_len, cfg.rope_theta)
    x = torch.randn(2, 9, cfg.d_model)
    torch.testing.assert_close(gqa(x, rot), mha(x, rot), atol=1e-6, rtol=1e-5)


def test_attention_is_causal(tiny):
    attn = Attention(tiny(qk_norm=True))
    rot = Rotary(16, 64, 10000.0)
    x = torch.randn(1, 8, 64)
    y = attn(x, rot)
    x2 = x.clone()
    x2[:, 5:] = torch.randn(1, 3, 64)  # changing the future must not change the past
    torch.testing.assert_close(attn(x2, rot)[:, :5], y[:, :5])


def test_mlps():
    x = torch.randn(2, 3, 8)
    sw = SwiGLU(8, 12)
    g, u = sw.gate_up.weight.split(12)
    torch.testing.assert_close(sw(x), (F.silu(x @ g.T) * (x @ u.T)) @ sw.down.weight.T)
    r = ReLU2(8, 12)
    torch.testing.assert_close(r(x), F.relu(x @ r.up.weight.T).square() @ r.down.weight.T)
    ge = GELU(8, 12)
    ref = F.gelu(x @ ge.up.weight.T, approximate="tanh") @ ge.down.weight.T
    torch.testing.assert_close(ge(x), ref)
    assert {"swiglu", "relu2", "gelu"} <= set(choices("mlp"))
    for m in (sw, r, ge):  # no biases anywhere
        assert all(not n.endswith("bias") for n, _ in m.named_parameters())


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("n", [1, 7, 600])
def test_linear_cross_entropy_matches_reference(softcap, n):
    """Fused loss = F.cross_entropy on full logits, in value and in both gradients."""
    d, v = 8, 2100  # v·rows > chunk budget only for n=600, so both 1 and many chunks run
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t = torch.randint(0, v, (n,))
    if n > 1:
        t[::3] = -1  # ignored positions
    loss = linear_cross_entropy(h, w, t, softcap)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    logits = h @ w.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ref = F.cross_entropy(logits, t, ignore_index=-1)
    rh, rw = torch.autograd.grad(ref * 3.0, (h, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-4)


def test_linear_cross_entropy_without_grad_does_no_backward_work():
    h, w = torch.randn(4, 8), torch.randn(32, 8)
    t = torch.randint(0, 32, (4,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.T, t))
