"""Which kernel path runs, and the results every path must share.

* The tiled (long-sequence) paths of the pool and token kernels in half precision and fp32 at
  a small N (``TILED_OVERRIDE`` forces them; the test asserts they ran), through the module,
  forward and backward, against the float64 reference with the file-wide criterion of
  ``test_sparo_readout_triton``.
* Fully masked samples (``eos < 0`` with input checks off) and ``eos >= N``: the same result on
  the one-tile path, the tiled path, the torch backend and the published reference (NaN rows
  for a sample with no valid token, every token for ``eos >= N``).
* Determinism: two fresh processes with fixed launch configurations give bitwise-equal outputs
  and gradients (on a GPU this catches races and order-dependent reductions; under the
  interpreter, reads of uninitialised memory).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accuracy import assert_close, readout_lengths
from sparo_fast import SparoReadout
from sparo_fast import sparo_readout_triton as triton_backend
from test_sparo_readout_triton import _compare_to_reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_backend.is_available(DEV), reason="needs Triton (GPU or interpreter)")


@pytest.fixture
def ops():
    from sparo_fast_kernels import sparo_readout_op as ops

    yield ops
    ops.TILED_OVERRIDE = None


@pytest.mark.parametrize("eos", [None, "random"], ids=["vision", "text"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_tiled_paths_match_reference(ops, dtype, eos):
    ops.TILED_OVERRIDE = 16  # N = 45: three token tiles, the last one partial
    ops.LAST_PATHS.clear()
    cfg = dict(B=3, N=45, D=40, H=2, S=3, A=6, Vd=5, V=7, share=eos is None, eos=eos, need_weights=True,
               grad_attn=True, noncontig=True, xscale=1.0, seed=21)
    _compare_to_reference(cfg, dtype)
    assert ops.LAST_PATHS == {"pool": "tiled", "token": "tiled"}


def _masked_rows(backend, eos, N, dtype, ops, tiled, compute=None):
    """out, attn of a seeded module on seeded tokens drawn in ``dtype``, computed in ``compute``
    (default ``dtype``; float64 for the reference of the same inputs)."""
    ops.TILED_OVERRIDE = 16 if tiled else None
    torch.manual_seed(0)
    m = SparoReadout(12, 4, 3, 4, num_heads=2, backend=backend).to(DEV, dtype)
    m.check_inputs = False
    x = torch.randn(len(eos), N, 12, device=DEV, dtype=dtype)
    x[4] = x[3]  # eos = N + 3 and 2**40: the same tokens, both all valid
    m, x = m.to(compute or dtype), x.to(compute or dtype)
    with torch.no_grad():
        return m(x, torch.tensor(eos, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_out_of_range_eos_same_on_every_path(ops, dtype):
    N = 37
    eos = [-1, 5, -7, N + 3, 2**40]  # none valid, a text, none valid, all valid, all valid (past int32)
    results = {"reference": _masked_rows("reference", eos, N, dtype, ops, False),
               "torch": _masked_rows("torch", eos, N, dtype, ops, False),
               "one_tile": _masked_rows("triton", eos, N, dtype, ops, False)}
    assert ops.LAST_PATHS["pool"] == "one_tile"
    results["tiled"] = _masked_rows("triton", eos, N, dtype, ops, True)
    assert ops.LAST_PATHS["pool"] == "tiled"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=5e-3, atol=2e-3)
    want_out, want_attn = results["reference"]
    # the kernel paths against the float64 reference of the same inputs with accuracy.py's
    # criterion (the reference and torch backends at ``dtype`` as PyTorch's error)
    ref64 = _masked_rows("reference", eos, N, dtype, ops, False, compute=torch.float64)
    ks = readout_lengths(len(eos), N, 12, 4, 2, 4, 4, 3)
    print("torch.manual_seed(0) (_masked_rows)")
    for path in ("one_tile", "tiled"):
        for i, name in enumerate(("out", "attn")):
            ok = ~torch.isnan(ref64[i])
            assert_close(f"{path} {name}", results[path][i][ok], ref64[i][ok],
                         tuple(results[b][i][ok] for b in ("reference", "torch")), dtype=dtype, K=ks[name],
                         seed="torch.manual_seed(0) (_masked_rows)")
    for b in (0, 2):  # no valid token: NaN attn and output, as torch.softmax gives
        assert torch.isnan(want_out[b]).all() and torch.isnan(want_attn[b]).all()
    for name, (out, attn) in results.items():
        assert torch.equal(torch.isnan(out), torch.isnan(want_out)), name
        assert torch.equal(torch.isnan(attn), torch.isnan(want_attn)), name
        ok = ~torch.isnan(want_out)
        torch.testing.assert_close(out[ok], want_out[ok], **tol, msg=name)
        ok = ~torch.isnan(want_attn)
        torch.testing.assert_close(attn[ok], want_attn[ok], **tol, msg=name)
    for name, (out, attn) in results.items():  # eos >= N: every token, however large (int64)
        assert torch.equal(out[3], out[4]) and torch.equal(attn[3], attn[4]), name


_CHILD = r"""
import os, sys, torch
from sparo_fast import SparoReadout
from sparo_fast_kernels import sparo_readout_op as ops, sparo_readout_bwd as bwd
ops.FIXED_CONFIGS = True  # each kernel's first config: no autotuning choice between processes
bwd.PROGRAMS_OVERRIDE = 2  # persistent programs that take several samples each
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"
B, N = (64, 300) if dev == "cuda" else (5, 21)
m = SparoReadout(48, 8, 6, 16, num_heads=4, backend="triton").to(dev)
x = torch.randn(B, N, 48, device=dev, requires_grad=True)
eos = torch.randint(0, N, (B,), device=dev)
out, attn = m(x, eos)
(out.square().sum() + attn.sum()).backward()
torch.save({"out": out, "attn": attn, "x": x.grad, **{n: p.grad for n, p in m.named_parameters()}}, sys.argv[1])
"""


def test_two_processes_bitwise_equal(tmp_path):
    env = dict(os.environ, SPARO_FAST_SELFCHECK="0")
    root = Path(__file__).resolve().parents[1]
    paths = []
    for i in range(2):
        p = tmp_path / f"run{i}.pt"
        subprocess.run([sys.executable, "-c", _CHILD, str(p)], check=True, env=env, cwd=root, timeout=600)
        paths.append(p)
    a, b = (torch.load(p) for p in paths)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between two processes"
