"""Dtypes behave like nn.Linear: low precision, autocast, float64, and empty batches."""
import pytest
import torch

from accuracy import assert_close, module_lengths
from sparo_fast import SparoReadout, backends


def _pair(backend, **kw):
    torch.manual_seed(0)
    m = SparoReadout(16, 6, 5, 4, num_heads=3, backend=backend, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(std=0.3)
    return m


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_modules(backend, dtype, tol):
    """Each formulation at low precision is as accurate as the other one (accuracy.py's criterion,
    the other backend's error as PyTorch's), and within the relative bound ``tol``."""
    other = {"reference": "torch", "torch": "reference"}[backend]
    x = torch.randn(3, 10, 16)
    eos = torch.tensor([9, 0, 4])
    ref_out, ref_attn = _pair(backend).double()(x.double(), eos)
    out, attn = _pair(backend).to(dtype)(x.to(dtype), eos)
    peer_out, peer_attn = _pair(other).to(dtype)(x.to(dtype), eos)
    assert out.dtype == dtype and attn.dtype == dtype
    ks = module_lengths(_pair(backend), x)
    assert_close("out", out, ref_out, peer_out, dtype=dtype, K=ks["out"], seed="torch.manual_seed(0) (_pair)")
    assert_close("attn", attn, ref_attn, peer_attn, dtype=dtype, K=ks["attn"], seed="torch.manual_seed(0) (_pair)")
    assert ((out.double() - ref_out).norm() / ref_out.norm()) < tol
    assert ((attn.double() - ref_attn).norm() / ref_attn.norm()) < tol


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_autocast_casts_like_linear(backend):
    """Autocast output dtypes as nn.Linear's; the bf16 output against the float64 module with
    accuracy.py's criterion (the other backend under the same autocast as PyTorch's error), and
    within the relative bound the test began with."""
    m = _pair(backend)
    x = torch.randn(2, 7, 16, requires_grad=True)
    lin = torch.nn.Linear(16, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x)
        expected = lin(x).dtype
        peer_out, _ = _pair({"reference": "torch", "torch": "reference"}[backend])(x)
    assert out.dtype == expected == torch.bfloat16 and attn.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and m.q_emb.grad.dtype == torch.float32
    ref64, _ = _pair(backend).double()(x.detach().double())
    assert_close("out", out, ref64, peer_out, dtype=torch.bfloat16, K=module_lengths(m, x)["out"],
                 seed="torch.manual_seed(0) (_pair)")
    ref_out, _ = m(x)
    assert ((out.float() - ref_out).norm() / ref_out.norm()) < 3e-2


def test_autocast_accepts_low_precision_tokens():
    """Towers under autocast emit bf16 tokens; the fp32-weight read-out must take them."""
    m = _pair("torch")
    x = torch.randn(2, 7, 16).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x)
    assert out.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="autocast"):
        m(x)  # outside autocast the dtypes must agree, as for nn.Linear


def test_need_weights_off_returns_none():
    m = SparoReadout(8, 4, 3, 2, need_weights=False)
    out, attn = m(torch.randn(2, 5, 8))
    assert attn is None and out.shape == (2, 4, 3)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_empty_batch(backend):
    m = SparoReadout(8, 4, 3, 2, backend=backend)
    x = torch.randn(0, 5, 8, requires_grad=True)
    out, attn = m(x, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 4, 3) and attn.shape == (0, 4, 5)
    out.sum().backward()  # still part of the graph
    assert x.grad.shape == x.shape


def test_non_contiguous_input():
    m = _pair("torch")
    y = torch.randn(10, 3, 16)  # [N, B, D], as a sequence-first transformer emits it
    out, attn = m(y.permute(1, 0, 2))
    ref = m(y.permute(1, 0, 2).contiguous())
    exact = _pair("torch").double()(y.permute(1, 0, 2).double())
    ks = module_lengths(m, y.permute(1, 0, 2))
    for name, got, contiguous, r in zip(("out", "attn"), (out, attn), ref, exact):
        assert_close(name, got, r, contiguous, dtype=torch.float32, K=ks[name], seed="torch.manual_seed(0) (_pair)")
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(attn, ref[1])


def test_need_weights_per_call_overrides_default_without_mutating():
    m = SparoReadout(8, 4, 3, 2, need_weights=False, backend="torch")
    x = torch.randn(2, 5, 8)
    out, attn = m(x, need_weights=True)
    assert attn is not None and attn.shape == (2, 4, 5)
    assert m.need_weights is False
    out2, attn2 = m(x)
    assert attn2 is None and torch.equal(out, out2)


def test_backend_names_validated_in_one_place():
    with pytest.raises(ValueError, match="unknown SPARO backend 'cuda'"):
        SparoReadout(8, 4, 3, 2, backend="cuda")
    with pytest.raises(ValueError, match="unknown SPARO backend 'tritn'"):
        backends.resolve("tritn", torch.device("cpu"))
