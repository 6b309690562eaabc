"""The ``triton`` backend: fused kernels from ``sparo_fast_kernels`` behind PyTorch ops.

``sparo_triton`` calls ``torch.ops.sparo_fast.readout_fwd`` on the published parameters (a
small kernel for the absorbed query, a zero-filled work counter and one persistent kernel);
its registered backward (a work counter, one persistent kernel and one small PyTorch sum) also
produces the parameters' gradients (``q_emb``, the shared or separate key/value weights,
``proj``). See ``kernels/sparo_readout_fwd.py``, ``kernels/sparo_readout_bwd.py``
and ``kernels/sparo_readout_op.py`` for the design.

Inputs the kernels cannot take (a dtype other than float16/bfloat16/float32, more than
``MAX_SLOTS`` slots, a value width over ``MAX_VALUE_DIM``) fall back to the torch backend
(``sparo_fast.functional.sparo_absorbed``) with a one-time warning per reason: never a wrong
answer. A device where the kernels cannot run at all (see ``is_available``) is an error.

First-use self-check: the first call per (device, dtype, shape bucket: N's power of two, D, L,
EOS or not) compares the kernels with the torch backend on the first ``SELFCHECK_SAMPLES``
samples of the real input, against a float64 truth: the forward outputs (the real call's own
rows, no extra kernel launch) and, when gradients are needed, one extra forward + backward of
the kernels on those samples. A result further from the truth than twice the torch backend's
error plus a floor (``_FLOOR_ULPS`` ulps of the result) warns once and sends that bucket to the
torch backend for the rest of the process. Its cost is one torch forward (+ backward) in the
compute dtype and one in float64 on two samples, once per bucket. On by default on CUDA
devices; ``SPARO_FAST_SELFCHECK=0`` turns it off, ``=1`` also turns it on under the CPU
interpreter (off there by default: it is a test tool, and its tests' batches are as small as
the check's). It is skipped while compiling or capturing a CUDA graph.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .functional import sparo_absorbed
from .params import ReadoutParams

_warned: set = set()
_KERNELS_MODULE = "sparo_fast_kernels.sparo_readout_op"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def is_available(device) -> bool:
    """True on CUDA when Triton imports; on CPU only under ``TRITON_INTERPRET=1``.

    Never queries the device. On CPU the kernels must also have been (or be about to be)
    defined under the interpreter: the variable is read when the kernel module is imported.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_importable()
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or not _triton_importable():
            return False
        mod = sys.modules.get(_KERNELS_MODULE)
        return mod is None or bool(mod.INTERPRETED)
    return False


def _ops():
    from sparo_fast_kernels import sparo_readout_op as ops

    return ops


def unsupported_reason(x: Tensor, q_emb: Tensor, v_weight: Tensor) -> Optional[str]:
    """Why the kernels cannot take these inputs, or None when they can."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (the kernels take float16, bfloat16, float32)"
    ops = _ops()
    _, n_heads, n_sub, _, _ = q_emb.shape
    L = n_heads * n_sub
    if L > ops.MAX_SLOTS:
        return f"L={L} slots (the kernels take at most {ops.MAX_SLOTS})"
    vd = v_weight.shape[0] // n_heads
    if vd > ops.MAX_VALUE_DIM:
        return f"value_dim={vd} (the kernels take at most {ops.MAX_VALUE_DIM})"
    return None


def _warn_once(reason: str) -> None:
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    warnings.warn(f"SparoReadout: the triton backend cannot take {reason}; "
                  "falling back to the torch backend", RuntimeWarning, stacklevel=3)


SELFCHECK_SAMPLES = 2
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# the criterion's floor, in ulps of the result: fp32 results of the kernels sum in another order
# than PyTorch (tens of ulps, see tests/test_sparo_readout_triton.py); half results: a few ulps
_FLOOR_ULPS = {torch.float32: 64, torch.float16: 4, torch.bfloat16: 4}
#: Outcome of each bucket's self-check: True (kernels agree), False (torch backend from now on).
_checked: Dict[Tuple, bool] = {}


def selfcheck_enabled(device: torch.device) -> bool:
    """``SPARO_FAST_SELFCHECK`` 1 / 0; unset: on for CUDA devices, off under the CPU interpreter
    (a test tool, where a check of two samples costs as much as a test's own small batch)."""
    env = os.environ.get("SPARO_FAST_SELFCHECK")
    return env == "1" if env is not None else device.type == "cuda"


def _bucket(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams, kind: str = "train") -> Tuple:
    """The self-check's key; ``kind`` "infer" for the inference kernel (checked on its own)."""
    from sparo_fast_kernels.sparo_readout_autotune import n_bucket

    B, N, D = x.shape
    key = (str(x.device), x.dtype, n_bucket(N), D, params.num_slots, eos_indices is not None)
    return key if kind == "train" else key + (kind,)


def _fused(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams, need_weights: bool):
    """The kernels' forward (autograd through the op's registered backward)."""
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    out, attn, _, _, _, _ = torch.ops.sparo_fast.readout_fwd(
        x, eos_indices, q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias, bool(need_weights))
    return out, (attn if need_weights else None)


def _agrees(got: List[Tensor], lo: List[Tensor], truth: List[Tensor], dtype: torch.dtype) -> Optional[str]:
    """None when every ``got`` is within 2x the torch backend's error (``lo``) of the float64
    ``truth`` plus the floor (NaN exactly where the truth has NaN), else what disagrees."""
    for i, (g, l_, t) in enumerate(zip(got, lo, truth)):
        if g is None or t is None:
            continue
        g, l_, t = g.detach().double(), l_.detach().double(), t.detach().double()
        nan = torch.isnan(t)
        if not torch.equal(torch.isnan(g), nan):
            return f"tensor {i}: NaN where the torch backend has none (or the reverse)"
        g, l_, t = g[~nan], l_[~nan], t[~nan]
        err, own = float((g - t).norm()), float((l_ - t).norm())
        allowed = 2.0 * own + _FLOOR_ULPS[dtype] * _EPS[dtype] * float(t.norm()) + 1e-6 * _EPS[dtype]
        if not err <= allowed:
            return f"tensor {i}: error {err:.3e} vs the float64 result, allowed {allowed:.3e}"
    return None


def _leaves(params: ReadoutParams, dtype: Optional[torch.dtype] = None) -> ReadoutParams:
    """Detached, gradient-requiring copies (in ``dtype``), one leaf per distinct tensor (a
    shared k/v weight stays shared, so the kernels take their shared path)."""
    leaf: Dict[int, Tensor] = {}
    for p in params:
        if id(p) not in leaf:
            leaf[id(p)] = p.detach().to(dtype or p.dtype).requires_grad_(True)
    return ReadoutParams(*(leaf[id(p)] for p in params))


def _grads(fn, x, eos, params, need_weights, g_out, g_attn) -> List[Tensor]:
    x = x.detach().requires_grad_(True)
    ps = _leaves(params, x.dtype)
    out, attn = fn(x, eos, ps, need_weights=need_weights)
    outs = (out, attn) if need_weights else (out,)
    grads = (g_out.to(x.dtype), g_attn.to(x.dtype)) if need_weights else (g_out.to(x.dtype),)
    uniq = [x] + list(dict.fromkeys(ps))
    return list(torch.autograd.grad(outs, uniq, grads, allow_unused=True))


def _self_check(x, eos, params, need_weights, out, attn, need_grad) -> Optional[str]:
    """Why the kernels disagree with the torch backend on this input's first samples, or None."""
    k = min(SELFCHECK_SAMPLES, x.shape[0])
    xs, es = x[:k].detach(), (eos[:k] if eos is not None else None)
    p = ReadoutParams(*(t.detach() for t in params))
    wide = _leaves(p, torch.float64)
    with torch.no_grad():
        lo = sparo_absorbed(xs, es, p, need_weights=need_weights)
        truth = sparo_absorbed(xs.double(), es, ReadoutParams(*(t.detach() for t in wide)), need_weights=need_weights)
    why = _agrees([out[:k], attn[:k] if need_weights else None], list(lo), list(truth), x.dtype)
    if why is not None or not need_grad:
        return why
    gen = torch.Generator().manual_seed(0)
    g_out = torch.randn(lo[0].shape, generator=gen, dtype=torch.float64).to(x.device)
    g_attn = torch.randn(lo[1].shape, generator=gen, dtype=torch.float64).to(x.device) if need_weights else None
    with torch.enable_grad():
        got = _grads(_fused, xs, es, p, need_weights, g_out, g_attn)
        lo_g = _grads(sparo_absorbed, xs, es, p, need_weights, g_out, g_attn)
        truth_g = _grads(sparo_absorbed, xs.double(), es, p, need_weights, g_out, g_attn)
    return _agrees(got, lo_g, truth_g, x.dtype)


def _checked_bucket(x, eos_indices, params, need_weights, out, attn, kind: str = "train") -> bool:
    """True when the kernels may serve this call's bucket (running its self-check if first)."""
    if not selfcheck_enabled(x.device) or torch.compiler.is_compiling() or (
            x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return True
    key = _bucket(x, eos_indices, params, kind)
    if key not in _checked:
        need_grad = kind == "train" and grad_needed(x, params)
        why = _self_check(x, eos_indices, params, need_weights, out, attn, need_grad)
        _checked[key] = why is None
        if why is not None:
            warnings.warn(f"SparoReadout: the triton kernels disagree with the torch backend on {key} ({why}); "
                          "using the torch backend for these inputs (SPARO_FAST_SELFCHECK=0 turns this check off)",
                          RuntimeWarning, stacklevel=4)
    return _checked[key]


def sparo_triton(
    x: Tensor,
    eos_indices: Optional[Tensor],
    params: ReadoutParams,
    need_weights: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """SPARO read-out through the fused Triton kernels; same contract as ``sparo_absorbed``."""
    if not is_available(x.device):
        raise RuntimeError(
            f"SparoReadout: the 'triton' backend is not available on {x.device} (it needs Triton and a CUDA "
            "device, or TRITON_INTERPRET=1 set before import on the CPU); use backend='torch' or 'auto'")
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    reason = unsupported_reason(x, q_emb, v_weight)
    if reason is not None:
        _warn_once(reason)
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    _ops()  # registers torch.ops.sparo_fast.*
    if not torch.compiler.is_compiling() and _checked.get(_bucket(x, eos_indices, params)) is False:
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    out, attn = _fused(x, eos_indices, params, need_weights)
    if not _checked_bucket(x, eos_indices, params, need_weights, out, attn):
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    return out, attn


def grad_needed(x: Tensor, params: ReadoutParams) -> bool:
    """True when autograd records this call (some input requires grad, grad mode on)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))


def infer_reason(x: Tensor, params: ReadoutParams) -> Optional[str]:
    """Why the inference kernel cannot take these inputs (the training kernels may), or None."""
    reason = unsupported_reason(x, params.q_emb, params.v_weight)
    if reason is not None:
        return reason
    from sparo_fast_kernels.sparo_readout_infer import supported

    B, N, D = x.shape
    if not supported(params.num_slots, N, D, x.dtype):
        return f"N={N} tokens (the fused inference kernel pools one tile: longer sequences take the training kernels)"
    return None


def _fused_infer(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams, need_weights: bool, qt: Tensor):
    """The inference kernel (no autograd formula: only where nothing needs gradients)."""
    _, _, _, v_weight, v_bias, proj_weight, proj_bias = params
    out, attn = torch.ops.sparo_fast.readout_infer(x, eos_indices, qt, v_weight, v_bias, proj_weight, proj_bias,
                                                   params.num_heads, params.attn_dim ** -0.5, bool(need_weights))
    return out, (attn if need_weights else None)


def sparo_triton_infer(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams, need_weights: bool,
                       qt: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """The no-grad path: ``torch.ops.sparo_fast.readout_infer`` with a precomputed (cached)
    unscaled absorbed query ``qt`` [L, D]: one memset and one kernel, nothing saved. Must not be
    called where autograd records (``grad_needed``): the op has no backward. Inputs the fused
    kernel cannot take go to ``sparo_triton`` (the training kernels), which itself falls back to
    the torch backend where needed; the first call per bucket is self-checked like the training
    kernels (``"infer"`` buckets)."""
    if grad_needed(x, params):
        raise RuntimeError("sparo_triton_infer: gradients are needed for this call; use sparo_triton")
    if not is_available(x.device) or infer_reason(x, params) is not None:  # sparo_triton says why
        return sparo_triton(x, eos_indices, params, need_weights=need_weights)
    _ops()
    if not torch.compiler.is_compiling() and _checked.get(_bucket(x, eos_indices, params, "infer")) is False:
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    out, attn = _fused_infer(x, eos_indices, params, need_weights, qt)
    if not _checked_bucket(x, eos_indices, params, need_weights, out, attn, "infer"):
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    return out, attn
