"""Numerical gradient checks of the absorbed torch backend (float64)."""
import pytest
import torch

from sparo_fast.functional import sparo_absorbed
from sparo_fast.params import ReadoutParams


def _params(dim, n_heads, n_sub, attn_dim, value_dim, V, share_kv):
    g = torch.Generator().manual_seed(1234)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q = r(1, n_heads, n_sub, 1, attn_dim)
    kw, kb = r(n_heads * attn_dim, dim), r(n_heads * attn_dim)
    vw, vb = (kw, kb) if share_kv else (r(n_heads * value_dim, dim), r(n_heads * value_dim))
    return q, kw, kb, vw, vb, r(V, value_dim), r(V)


@pytest.mark.parametrize("share_kv,n_heads,n_sub,eos", [
    (True, 3, 1, False), (False, 2, 2, True), (False, 1, 3, True)])
def test_gradcheck_torch_backend(share_kv, n_heads, n_sub, eos):
    B, N, D, A = 2, 5, 6, 4
    Vd = A if share_kv else 3
    params = _params(D, n_heads, n_sub, A, Vd, 5, share_kv)
    x = torch.randn(B, N, D, dtype=torch.float64, requires_grad=True)
    eos_idx = torch.tensor([0, N - 2]) if eos else None

    def f(x, *p):
        out, attn = sparo_absorbed(x, eos_idx, ReadoutParams(*p))
        return out, attn

    inputs = (x,) + (params if not share_kv else params[:3] + params[5:])
    if share_kv:
        def f(x, q, kw, kb, pw, pb):  # noqa: F811 - value projection is the key projection
            return sparo_absorbed(x, eos_idx, ReadoutParams(q, kw, kb, kw, kb, pw, pb))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6)
