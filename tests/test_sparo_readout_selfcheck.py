"""The triton backend's first-use self-check (see ``sparo_fast.sparo_readout_triton``).

A kernel result made wrong on purpose (monkeypatched, forward or backward) must be caught on
the bucket's first call: one warning, the torch backend's result, and the torch backend for
that bucket from then on; a correct kernel passes silently; ``SPARO_FAST_SELFCHECK=0`` turns
the check off (``=1`` turns it on under the interpreter, where it is off by default).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from accuracy import assert_close, module_lengths
from sparo_fast import SparoReadout
from sparo_fast import sparo_readout_triton as tb

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not tb.is_available(DEV), reason="needs Triton (GPU or interpreter)")
SEED = 3


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("SPARO_FAST_SELFCHECK", "1")
    monkeypatch.setattr(tb, "_checked", {})


def _modules(N=9):
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    m = SparoReadout(16, 4, 5, 8, num_heads=2, share_kv=False, backend="triton").to(DEV)
    ref = SparoReadout(16, 4, 5, 8, num_heads=2, share_kv=False, backend="torch").to(DEV)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, N, 16, device=DEV)
    eos = torch.tensor([N - 1, 2, 5], device=DEV)
    return m, ref, x, eos


def _grads(m, x, eos):
    x = x.clone().requires_grad_(True)
    m.zero_grad()
    out, attn = m(x, eos)
    (out.square().sum() + (attn * torch.linspace(0, 1, attn.shape[-1], device=DEV)).sum()).backward()
    return out.detach(), attn.detach(), x.grad, m.k.weight.grad.clone()


def test_correct_kernels_pass_silently():
    m, ref, x, eos = _modules()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grads(m, x, eos)
    assert list(tb._checked.values()) == [True]
    want = _grads(ref, x, eos)
    # against the float64 module with accuracy.py's criterion (the torch backend as PyTorch's error)
    m64 = SparoReadout(16, 4, 5, 8, num_heads=2, share_kv=False, backend="reference").to(DEV, torch.float64)
    m64.load_state_dict(m.state_dict())
    exact = _grads(m64, x.double(), eos)
    ks = module_lengths(m, x)
    for name, g, w, r in zip(("out", "attn", "x", "k.weight"), got, want, exact):
        assert_close(name, g, r, w, dtype=torch.float32, K=ks[name], seed=SEED)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_wrong_forward_warns_once_and_falls_back(monkeypatch):
    real = tb._fused

    def wrong(*a, **k):
        out, attn = real(*a, **k)
        return out * (1 + 1e-3), attn

    monkeypatch.setattr(tb, "_fused", wrong)
    m, ref, x, eos = _modules()
    with pytest.warns(RuntimeWarning, match="disagree with the torch backend"):
        out, attn = m(x, eos)
    assert list(tb._checked.values()) == [False]
    want, want_attn = ref(x, eos)
    assert torch.equal(out, want) and torch.equal(attn, want_attn)  # the torch backend's result itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2, _ = m(x * 2, eos)  # same bucket: torch backend again, no second warning
    assert torch.equal(out2, ref(x * 2, eos)[0])


def test_wrong_backward_is_caught(monkeypatch):
    from sparo_fast_kernels import sparo_readout_op as ops

    real = ops.launch_bwd_fused

    def wrong(*a, **k):
        dx, dq, dwk, *rest = real(*a, **k)
        return (dx, dq * (1 + 1e-3), dwk * (1 + 1e-3), *rest)  # dq_emb and dW_K off by 0.1%

    monkeypatch.setattr(ops, "launch_bwd_fused", wrong)
    m, ref, x, eos = _modules()
    with pytest.warns(RuntimeWarning, match="tensor"):
        got = _grads(m, x, eos)
    assert list(tb._checked.values()) == [False]
    want = _grads(ref, x, eos)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_no_check_without_gradients_runs_no_backward(monkeypatch):
    """Under no_grad the check compares the forward only (no extra kernel launch)."""
    calls = []
    real = tb._fused
    monkeypatch.setattr(tb, "_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, _, x, eos = _modules()
    with torch.no_grad():
        m(x, eos)
    assert calls == [1] and list(tb._checked.values()) == [True]


def test_opt_out(monkeypatch):
    monkeypatch.setenv("SPARO_FAST_SELFCHECK", "0")
    real = tb._fused
    monkeypatch.setattr(tb, "_fused", lambda *a, **k: (real(*a, **k)[0] * 2, None))
    m, ref, x, eos = _modules()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = m(x, eos, need_weights=False)
    assert tb._checked == {}
    torch.testing.assert_close(out, 2 * ref(x, eos)[0], rtol=1e-4, atol=1e-5)  # unchecked: the wrong result


def test_default_on_for_cuda_only(monkeypatch):
    monkeypatch.delenv("SPARO_FAST_SELFCHECK")
    assert tb.selfcheck_enabled(torch.device("cuda", 0))
    assert not tb.selfcheck_enabled(torch.device("cpu"))
    monkeypatch.setenv("SPARO_FAST_SELFCHECK", "0")
    assert not tb.selfcheck_enabled(torch.device("cuda", 0))
