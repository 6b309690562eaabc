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

from . import sparo_readout_autotune as at
from .sparo_readout_bwd import _bwd_finish_kernel, _bwd_slot_kernel, _bwd_token_kernel, num_programs
from .sparo_readout_fwd import _fwd_pool_kernel, _fwd_proj_kernel, dot_precision

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
        at.launch(kernel, grid, args, meta, space, key, tag)


# Explicit schemas; the annotations of the functions below infer the same ones (older torch
# releases ignored ``schema=`` in ``triton_op`` and inferred it from the annotations).
_FWD_SCHEMA = ("(Tensor x, Tensor? eos_indices, Tensor q_emb, Tensor k_weight, Tensor k_bias, Tensor v_weight, "
               "Tensor v_bias, Tensor proj_weight, Tensor proj_bias, bool need_weights) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor? grad_attn, Tensor x, Tensor? eos_indices, Tensor q_emb, Tensor k_weight, "
               "Tensor qt, Tensor v_weight, Tensor proj_weight, Tensor lse, Tensor xp, Tensor o, bool shared_kv) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _readout_fwd(x: Tensor, eos_indices: Optional[Tensor], q_emb: Tensor, k_weight: Tensor, k_bias: Tensor,
                v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                need_weights: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    _, H, S, _, A = q_emb.shape
    L = H * S
    vd = v_weight.shape[0] // H
    V = proj_weight.shape[0]
    # the absorbed query, unscaled (the kernels apply 1/sqrt(A)): the one PyTorch launch
    qt = torch.matmul(q_emb.reshape(H, S, A), k_weight.view(H, A, D)).reshape(L, D)
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
            (x, eos, qt, scr, attn if need_weights else lse, lse, xp, float(A) ** -0.5, B, N, D, L, S,
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
    return out, attn, qt, lse, xp, o


def _readout_bwd(grad_out: Tensor, grad_attn: Optional[Tensor], x: Tensor, eos_indices: Optional[Tensor],
                q_emb: Tensor, k_weight: Tensor, qt: Tensor, v_weight: Tensor, proj_weight: Tensor, lse: Tensor,
                xp: Tensor, o: Tensor, shared_kv: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    _, H, S, _, A = q_emb.shape
    L = H * S
    vd = v_weight.shape[0] // H
    V = proj_weight.shape[0]
    M = B * S
    g = grad_out.contiguous()
    v_weight, proj_weight = v_weight.contiguous(), proj_weight.contiguous()
    prec = dot_precision(x.dtype)
    # 1. slot level: go, gxp (head-major), dW_V, db_V, per-head dW_O / db_O partials
    gxp = torch.empty((H, M, D), device=x.device, dtype=x.dtype)
    dwv = torch.empty_like(v_weight)
    dbv = torch.empty((H * vd,), device=x.device, dtype=v_weight.dtype)
    dwo_p = torch.empty((H, V, vd), device=x.device, dtype=torch.float32)
    dbo_p = torch.empty((H, V), device=x.device, dtype=torch.float32)
    meta = at.slot_meta(M, D, vd, V, x.dtype)
    space = at.slot_space(M, D, vd, V, x.dtype)

    def grid(m):
        return (H, triton.cdiv(D, m["BD"]))

    _launch(_bwd_slot_kernel, grid if not INTERPRETED else grid(space[0]),
            (g, o, xp, v_weight, proj_weight, gxp, dwv, dbv, dwo_p, dbo_p, B, S, L, D, vd, V),
            dict(DOT_PREC=prec, UPCAST=_upcast(x), **meta), space, ["M", "D", "VD", "V"], (D, vd, V, x.dtype))
    # 2. token level: persistent programs with per-program dqt partials
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
            (x, eos, lse, ga, gxp, qt, scr, dx, part, float(A) ** -0.5, B, N, D, L, S, P,
             x.stride(0), x.stride(1), x.stride(2), ga.stride(0), ga.stride(1), ga.stride(2)),
            dict(HAS_EOS=has_eos, HAS_GA=has_ga, DOT_PREC=prec, UPCAST=_upcast(x), **meta),
            at.bwd_space(L, N, D, x.dtype), ["N", "D", "L"], (at.n_bucket(N), D, L, x.dtype, has_eos, has_ga))
    # 3. weight level: dqt reduction (fixed order), dq_emb, dW_K (+ dW_V when shared), dW_O, db_O
    dq = torch.empty_like(q_emb)
    dwk = torch.empty_like(k_weight)
    dwo = torch.empty_like(proj_weight)
    dbo = torch.empty((V,), device=x.device, dtype=proj_weight.dtype)
    cfg, w, st = at.split(at.finish_space(S, A, D)[0])
    fin = _bwd_finish_kernel if INTERPRETED else wrap_triton(_bwd_finish_kernel)
    fin[(H,)](part, q_emb.contiguous(), k_weight.contiguous(), dwv, dwo_p, dbo_p, dq, dwk, dwo, dbo,
              P, H, S, A, D, V, vd, triton.cdiv(V, H), SHARED=shared_kv, **at.finish_meta(S, A, H, vd, V), **cfg,
              num_warps=w, num_stages=st)
    if shared_kv:
        dwv = dwv.new_empty((0,))  # already added into dW_K
    return dx, dq, dwk, dwv, dbv, dwo, dbo


readout_fwd = triton_op("sparo_fast::readout_fwd", mutates_args=(), schema=_FWD_SCHEMA)(_readout_fwd)
readout_bwd = triton_op("sparo_fast::readout_bwd", mutates_args=(), schema=_BWD_SCHEMA)(_readout_bwd)


# ----------------------------------------------------------------------------- fake impls
@readout_fwd.register_fake
def _readout_fwd_fake(x, eos_indices, q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias,
                      need_weights):
    B, N, D = x.shape
    _, H, S, _, _ = q_emb.shape
    L = H * S
    vd = v_weight.shape[0] // H
    V = proj_weight.shape[0]
    return (x.new_empty((B, L, V)), x.new_empty((B, L, N) if need_weights else (0,)), x.new_empty((L, D)),
            x.new_empty((B, L), dtype=torch.float32), x.new_empty((H, B * S, D)), x.new_empty((B, L, vd)))


@readout_bwd.register_fake
def _readout_bwd_fake(grad_out, grad_attn, x, eos_indices, q_emb, k_weight, qt, v_weight, proj_weight, lse, xp, o,
                      shared_kv):
    V = proj_weight.shape[0]
    return (x.new_empty(x.shape), q_emb.new_empty(q_emb.shape), k_weight.new_empty(k_weight.shape),
            v_weight.new_empty((0,) if shared_kv else v_weight.shape), v_weight.new_empty((v_weight.shape[0],)),
            proj_weight.new_empty(proj_weight.shape), proj_weight.new_empty((V,)))


# ----------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, eos_indices, q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias, need_weights = inputs
    _, _, qt, lse, xp, o = output
    ctx.has_eos = eos_indices is not None
    # share_kv (one tensor for k and v): the finish kernel adds dW_V into dW_K, and the key bias's
    # (exactly zero) gradient needs no launch; separate tensors are always correct too
    ctx.shared_w = k_weight is v_weight
    ctx.shared_b = k_bias is v_bias
    ctx.save_for_backward(x, eos_indices if ctx.has_eos else None, q_emb, k_weight, qt, v_weight, proj_weight,
                          lse, xp, o)
    ctx.need_weights = need_weights
    ctx.k_bias_meta = (k_bias.shape, k_bias.dtype)
    ctx.mark_non_differentiable(qt, lse, xp, o)
    # no zero-filled gradients for the saved-state outputs (nor for out/attn when unused): four
    # launches and a [Hh, B*S, D]-sized memset fewer per backward
    ctx.set_materialize_grads(False)


def _backward(ctx, g_out, g_attn, _gqt, _glse, _gxp, _go):
    x, eos_indices, q_emb, k_weight, qt, v_weight, proj_weight, lse, xp, o = ctx.saved_tensors
    B, N, _ = x.shape
    L = qt.shape[0]
    if g_out is None:
        g_out = x.new_zeros((B, L, proj_weight.shape[0]))
    if not ctx.need_weights or g_attn is None:
        g_attn = None
    dx, dq, dwk, dwv, dbv, dwo, dbo = torch.ops.sparo_fast.readout_bwd(
        g_out, g_attn, x, eos_indices, q_emb, k_weight, qt, v_weight, proj_weight, lse, xp, o, ctx.shared_w)
    shape, dtype = ctx.k_bias_meta
    # the key bias cancels in the softmax: its gradient is exactly zero (no launch when shared with v)
    dkb = None if ctx.shared_b else torch.zeros(shape, dtype=dtype, device=x.device)
    return dx, None, dq, dwk, dkb, (None if ctx.shared_w else dwv), dbv, dwo, dbo, None


readout_fwd.register_autograd(_backward, setup_context=_setup_context)


def _keep_opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


if INTERPRETED:
    # Interpreted kernels cannot be traced into a graph: keep the ops opaque for compile.
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    readout_fwd.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
    readout_bwd.register_torch_dispatch(FunctionalTensorMode, _keep_opaque)
