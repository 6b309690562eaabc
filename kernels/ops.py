"""PyTorch operators over the SPARO Triton kernels: ``torch.ops.sparo_fast.readout_fwd/bwd``.

Both are ``torch.library.triton_op`` with explicit schemas; every output (and scratch) is
allocated here, outside the kernels, and the kernels are launched through ``wrap_triton``,
so ``torch.compile`` traces them without graph breaks (Inductor sees the kernels on CUDA).
``readout_fwd`` has an autograd formula (``register_autograd``) that calls
``readout_bwd``; both have allocation-only fake implementations.

On a GPU each kernel is a ``triton.autotune`` over the pruned space of ``autotune.py`` for its
shape key; under the Triton CPU interpreter (``TRITON_INTERPRET=1``, set before this module is
imported) the kernels are ``InterpretedFunction`` objects, which cannot be traced: they are
launched directly with the space's first (fixed) config (older torch releases' ``wrap_triton``
reject them), and the ops are kept opaque under ``torch.compile`` (the FunctionalTensorMode
decomposition is replaced by a plain redispatch).

``readout_fwd(x, eos_indices, qt, scale, k_bias, v_weight, v_bias, proj_weight, proj_bias,
num_heads, need_weights) -> (out, attn, lse, xp, o)``: ``qt`` is the *unscaled* absorbed query
``W_K[h]^T q_l`` [L, D] (computed by PyTorch, so autograd carries dqt to ``q_emb`` and
``k.weight``) and ``scale`` the ``1/sqrt(A)`` the kernels apply to the scores; ``k_bias`` is
only there to receive its (exactly zero) gradient; ``attn`` is an empty tensor when
``need_weights`` is false; ``lse`` (fp32 [B, L], log2 domain), ``xp`` (pooled tokens,
head-major [Hh, B*S, D]) and ``o`` (pooled values [B, L, Vd]) are the state saved for the
backward. ``readout_bwd(grad_out, grad_attn, x, eos_indices, qt, scale, v_weight, proj_weight,
lse, xp, o, num_heads) -> (dx, dqt, dW_V, db_V, dW_O, db_O)``.

Launches: forward = ``qt`` (one PyTorch matmul, in the backend) + 2 kernels; backward = 1
kernel + 8 small PyTorch ops on slot-level tensors (see ``_readout_bwd``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import autotune as at
from .sparo_bwd import _bwd_token_kernel, num_programs
from .sparo_fwd import _fwd_pool_kernel, _fwd_proj_kernel, dot_precision

try:
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover
    _JITFunction = ()

#: True when the kernels were defined under the Triton CPU interpreter.
INTERPRETED = not isinstance(_fwd_pool_kernel, _JITFunction)

MAX_SLOTS = 128      # all slots of a sample live in one block in the backward kernel
MAX_VALUE_DIM = 256  # the pooled value row o [BM, Vd] lives in registers in the projection kernel


def _upcast(x: Tensor) -> bool:
    """fp32 products for bfloat16 under the interpreter only (its bf16 ``tl.dot`` is broken)."""
    return INTERPRETED and x.dtype == torch.bfloat16


def _launch(kernel, grid, args, meta, space, key, tag):
    """The interpreter: the space's first config; a GPU: ``triton.autotune`` over the space."""
    if INTERPRETED:
        cfg, w, st = at.split(space[0])
        kernel[grid](*args, **meta, **cfg, num_warps=w, num_stages=st)
    else:
        wrap_triton(at.tuned(kernel, space, key, tag))[grid](*args, **meta)


# Explicit schemas; the annotations of the functions below infer the same ones (older torch
# releases ignored ``schema=`` in ``triton_op`` and inferred it from the annotations).
_FWD_SCHEMA = ("(Tensor x, Tensor? eos_indices, Tensor qt, float scale, Tensor k_bias, Tensor v_weight, "
               "Tensor v_bias, Tensor proj_weight, Tensor proj_bias, int num_heads, bool need_weights) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor? grad_attn, Tensor x, Tensor? eos_indices, Tensor qt, float scale, "
               "Tensor v_weight, Tensor proj_weight, Tensor lse, Tensor xp, Tensor o, int num_heads) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _readout_fwd(x: Tensor, eos_indices: Optional[Tensor], qt: Tensor, scale: float, k_bias: Tensor,
                v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, num_heads: int,
                need_weights: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    L = qt.shape[0]
    H = num_heads
    vd = v_weight.shape[0] // H
    V = proj_weight.shape[0]
    S = L // H
    qt = qt.contiguous()
    v_weight, v_bias = v_weight.contiguous(), v_bias.contiguous()
    proj_weight, proj_bias = proj_weight.contiguous(), proj_bias.contiguous()
    meta = at.pool_meta(L, N, D, x.dtype)
    lse = torch.empty((B, L), device=x.device, dtype=torch.float32)
    scr = lse if meta["ONE_TILE"] else torch.empty((B, L, N), device=x.device, dtype=torch.float32)
    attn = torch.empty((B, L, N) if need_weights else (0,), device=x.device, dtype=x.dtype)
    xp = torch.empty((H, B * S, D), device=x.device, dtype=x.dtype)
    o = torch.empty((B, L, vd), device=x.device, dtype=x.dtype)
    out = torch.empty((B, L, V), device=x.device, dtype=x.dtype)
    has_eos = eos_indices is not None
    eos = eos_indices.contiguous() if has_eos else lse
    prec = dot_precision(x.dtype)
    _launch(_fwd_pool_kernel, (B, triton.cdiv(L, meta["BL"])),
            (x, eos, qt, scr, attn if need_weights else lse, lse, xp, scale, B, N, D, L, S,
             x.stride(0), x.stride(1), x.stride(2)),
            dict(HAS_EOS=has_eos, NEED_WEIGHTS=need_weights, DOT_PREC=prec, UPCAST=_upcast(x), **meta),
            at.pool_space(L, N, D, x.dtype), ["N", "D", "L"], (at.n_bucket(N), D, L, x.dtype, has_eos))
    M = B * S
    meta = at.proj_meta(M, D, vd, V, x.dtype)
    space = at.proj_space(M, D, vd, V, x.dtype)

    def grid(m):
        return (triton.cdiv(M, m["BM"]), H)

    _launch(_fwd_proj_kernel, grid if not INTERPRETED else grid(space[0]),
            (xp, v_weight, v_bias, proj_weight, proj_bias, o, out, M, S, L, D, vd, V),
            dict(DOT_PREC=prec, UPCAST=_upcast(x), **meta), space, ["M", "D", "VD", "V"],
            (D, vd, V, x.dtype))
    return out, attn, lse, xp, o


def _readout_bwd(grad_out: Tensor, grad_attn: Optional[Tensor], x: Tensor, eos_indices: Optional[Tensor],
                qt: Tensor, scale: float, v_weight: Tensor, proj_weight: Tensor, lse: Tensor, xp: Tensor,
                o: Tensor, num_heads: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    L = qt.shape[0]
    H = num_heads
    S = L // H
    vd = v_weight.shape[0] // H
    V = proj_weight.shape[0]
    g = grad_out.contiguous()
    # slot-level GEMMs (cuBLAS), head-major: xp and gxp are [H, B*S, D], no permute copies of them
    dwo = torch.matmul(g.reshape(B * L, V).t(), o.reshape(B * L, vd))
    dbo = g.sum(dim=(0, 1))
    go_h = torch.matmul(g.view(B, H, S, V).transpose(0, 1), proj_weight).reshape(H, B * S, vd)
    dwv = torch.bmm(go_h.transpose(1, 2), xp).reshape(H * vd, D)
    dbv = go_h.sum(dim=1).reshape(H * vd)
    gxp = torch.bmm(go_h, v_weight.reshape(H, vd, D))  # [H, B*S, D], the layout the kernel reads
    qt = qt.contiguous()
    # token-level work (Triton), persistent programs with per-program dqt partials
    P = num_programs(B, x.device)
    meta = at.bwd_meta(L, N, D, x.dtype)
    scr = lse if meta["ONE_TILE"] else torch.empty((P, 2, L, N), device=x.device, dtype=torch.float32)
    dx = torch.empty((B, N, D), device=x.device, dtype=x.dtype)
    part = torch.empty((P, L, D), device=x.device, dtype=torch.float32)
    has_ga = grad_attn is not None
    ga = grad_attn if has_ga else lse.view(B, L, 1)
    has_eos = eos_indices is not None
    eos = eos_indices.contiguous() if has_eos else lse
    _launch(_bwd_token_kernel, (P,),
            (x, eos, lse, ga, gxp, qt, scr, dx, part, scale, B, N, D, L, S, P,
             x.stride(0), x.stride(1), x.stride(2), ga.stride(0), ga.stride(1), ga.stride(2)),
            dict(HAS_EOS=has_eos, HAS_GA=has_ga, DOT_PREC=dot_precision(x.dtype), UPCAST=_upcast(x), **meta),
            at.bwd_space(L, N, D, x.dtype), ["N", "D", "L"], (at.n_bucket(N), D, L, x.dtype, has_eos, has_ga))
    dqt = part.sum(dim=0).to(qt.dtype)  # deterministic batch-wide reduction
    return dx, dqt, dwv, dbv, dwo, dbo


readout_fwd = triton_op("sparo_fast::readout_fwd", mutates_args=(), schema=_FWD_SCHEMA)(_readout_fwd)
readout_bwd = triton_op("sparo_fast::readout_bwd", mutates_args=(), schema=_BWD_SCHEMA)(_readout_bwd)


# ----------------------------------------------------------------------------- fake impls
@readout_fwd.register_fake
def _readout_fwd_fake(x, eos_indices, qt, scale, k_bias, v_weight, v_bias, proj_weight, proj_bias, num_heads,
                      need_weights):
    B, N, D = x.shape
    L = qt.shape[0]
    vd = v_weight.shape[0] // num_heads
    V = proj_weight.shape[0]
    return (x.new_empty((B, L, V)), x.new_empty((B, L, N) if need_weights else (0,)),
            x.new_empty((B, L), dtype=torch.float32), x.new_empty((num_heads, B * (L // num_heads), D)),
            x.new_empty((B, L, vd)))


@readout_bwd.register_fake
def _readout_bwd_fake(grad_out, grad_attn, x, eos_indices, qt, scale, v_weight, proj_weight, lse, xp, o,
                      num_heads):
    B, N, D = x.shape
    return (x.new_empty((B, N, D)), qt.new_empty(qt.shape), grad_out.new_empty(v_weight.shape),
            grad_out.new_empty((v_weight.shape[0],)), grad_out.new_empty(proj_weight.shape),
            grad_out.new_empty((proj_weight.shape[0],)))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, eos_indices, qt, scale, k_bias, v_weight, v_bias, proj_weight, proj_bias, num_heads, need_weights = inputs
    _, _, lse, xp, o = output
    ctx.has_eos = eos_indices is not None
    ctx.scale = scale
    ctx.save_for_backward(x, eos_indices if ctx.has_eos else None, qt, v_weight, proj_weight, lse, xp, o)
    ctx.num_heads = num_heads
    ctx.need_weights = need_weights
    ctx.k_bias_meta = (k_bias.shape, k_bias.dtype)
    ctx.shared_bias = k_bias is v_bias  # share_kv: v_bias's gradient reaches the tensor anyway
    ctx.mark_non_differentiable(lse, xp, o)


def _backward(ctx, g_out, g_attn, _glse, _gxp, _go):
    x, eos_indices, qt, v_weight, proj_weight, lse, xp, o = ctx.saved_tensors
    B, N, _ = x.shape
    L = qt.shape[0]
    if g_out is None:
        g_out = x.new_zeros((B, L, proj_weight.shape[0]))
    if not ctx.need_weights or g_attn is None:
        g_attn = None
    dx, dqt, dwv, dbv, dwo, dbo = torch.ops.sparo_fast.readout_bwd(
        g_out, g_attn, x, eos_indices, qt, ctx.scale, v_weight, proj_weight, lse, xp, o, ctx.num_heads)
    shape, dtype = ctx.k_bias_meta
    # the key bias cancels in the softmax: its gradient is exactly zero (no launch when shared with v)
    dkb = None if ctx.shared_bias else torch.zeros(shape, dtype=dtype, device=x.device)
    return dx, None, dqt, None, dkb, dwv, dbv, dwo, dbo, None, None


readout_fwd.register_autograd(_backward, setup_context=_setup_context)


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


if INTERPRETED:
    # Interpreted kernels cannot be traced into a graph: keep the ops opaque for compile.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    readout_fwd.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    readout_bwd.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
