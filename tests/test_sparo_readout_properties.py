"""Property tests: the absorbed torch backend equals the published math on random configurations."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparo_fast import SparoReadout


@st.composite
def configs(draw):
    n_heads = draw(st.integers(1, 4))
    n_sub = draw(st.integers(1, 3))
    share_kv = draw(st.booleans())
    attn_dim = draw(st.integers(1, 9))
    value_dim = attn_dim if share_kv else draw(st.integers(1, 9))
    return dict(
        dim=draw(st.integers(1, 13)), L=n_heads * n_sub, V=draw(st.integers(1, 7)), attn_dim=attn_dim,
        value_dim=value_dim, num_heads=n_heads, share_kv=share_kv)


@given(cfg=configs(), B=st.integers(1, 3), N=st.integers(1, 12), text=st.booleans(),
       eos_mode=st.sampled_from(["random", "zero", "last"]), seed=st.integers(0, 2**31 - 1))
def test_torch_backend_matches_reference(cfg, B, N, text, eos_mode, seed):
    torch.manual_seed(seed)
    ref = SparoReadout(**cfg, backend="reference", dtype=torch.float64)
    with torch.no_grad():  # non-zero biases so that every bias gradient path is exercised
        for p in ref.parameters():
            p.normal_()
    fast = SparoReadout(**cfg, backend="torch", dtype=torch.float64)
    fast.load_state_dict(ref.state_dict(), strict=True)

    x = torch.randn(B, N, cfg["dim"], dtype=torch.float64)
    eos = None
    if text:
        eos = {"random": torch.randint(0, N, (B,)), "zero": torch.zeros(B, dtype=torch.long),
               "last": torch.full((B,), N - 1)}[eos_mode]
    g_out = torch.randn(B, cfg["L"], cfg["V"], dtype=torch.float64)
    g_attn = torch.randn(B, cfg["L"], N, dtype=torch.float64)

    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        out, attn = m(xi, eos)
        ((out * g_out).sum() + (attn * g_attn).sum()).backward()
        results.append((out, attn, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (o1, a1, gx1, gp1), (o2, a2, gx2, gp2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a2, a1, rtol=1e-9, atol=1e-10)
    if eos is not None:  # masked tokens get exactly zero attention
        masked = torch.arange(N)[None, None, :] > eos[:, None, None]
        assert torch.all(a2.masked_select(masked) == 0)
    torch.testing.assert_close(gx2, gx1, rtol=1e-9, atol=1e-10)
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        torch.testing.assert_close(gp2[name], gp1[name], rtol=1e-9, atol=1e-9, msg=name)
