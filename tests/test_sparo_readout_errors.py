"""Every bad input raises the documented error, naming what is wrong."""
import pytest
import torch

from sparo_fast import SparoReadout, normalize_slots
from sparo_fast import sparo_readout_triton as triton_backend


@pytest.fixture
def m():
    return SparoReadout(8, 4, 3, 2)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 8), "3-D"),
    (torch.randn(1, 2, 3, 8), "3-D"),
    (torch.randn(2, 5, 7), "dim=8"),
    (torch.randn(2, 0, 8), "N = 0"),
])
def test_bad_x_shape(m, x, match):
    with pytest.raises(ValueError, match=match):
        m(x)


def test_bad_x_type(m):
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([[1.0] * 8])
    with pytest.raises(TypeError, match="float64 but the parameters are torch.float32"):
        m(torch.randn(2, 5, 8, dtype=torch.float64))


@pytest.mark.parametrize("eos,exc,match", [
    (torch.tensor([1, 2, 3]), ValueError, r"shape \[batch\]"),
    (torch.tensor([[1, 2]]), ValueError, r"shape \[batch\]"),
    (torch.tensor([1.0, 2.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
    (torch.tensor([0, 5]), ValueError, r"\[0, 4\]"),
    (torch.tensor([-1, 2]), ValueError, r"\[0, 4\]"),
    ([1, 2], TypeError, "torch.Tensor"),
    (torch.tensor([1, 2], device="meta"), ValueError, "is on meta"),
])
def test_bad_eos(m, eos, exc, match):
    with pytest.raises(exc, match=match):
        m(torch.randn(2, 5, 8), eos)


def test_nan_check_is_opt_in(m):
    x = torch.randn(2, 5, 8)
    x[1, 2, 3] = float("nan")
    out, _ = m(x)  # default: no extra pass over x
    assert torch.isnan(out[1]).any()
    m.check_finite = True
    with pytest.raises(ValueError, match="NaN"):
        m(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=8, L=6, V=3, attn_dim=2, num_heads=4), "divisible by num_heads"),
    (dict(dim=8, L=4, V=3, attn_dim=2, value_dim=3), "share_kv"),
    (dict(dim=0, L=4, V=3, attn_dim=2), "dim must be a positive integer"),
    (dict(dim=8, L=4, V=3, attn_dim=2, backend="cuda"), "unknown SPARO backend"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparoReadout(**kwargs)


def test_triton_backend_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_backend, "is_available", lambda device: False)
    m = SparoReadout(8, 4, 3, 2, backend="triton")
    with pytest.raises(RuntimeError, match="'triton' backend is not available"):
        m(torch.randn(2, 5, 8))
    m.backend = "auto"  # auto never picks an unavailable backend
    assert m(torch.randn(2, 5, 8))[0].shape == (2, 4, 3)


def test_bad_sparo_type():
    with pytest.raises(ValueError, match="unsupported sparo_type"):
        normalize_slots(torch.randn(2, 4, 3), "sem:norm")
    with pytest.raises(ValueError, match="<rep>:<norm>"):
        normalize_slots(torch.randn(2, 4, 3), "cont")
