"""Jit helpers shared by the forward and backward SPARO kernels (one family, one name each).

* ``_dot``: ``tl.dot`` with fp32 accumulation (and the interpreter's bf16 work-around);
* ``_n_valid``: how many leading tokens of a sample are valid (the EOS mask);
* ``_xp_rows``: rows of the head-major ``[Hh, B*S, D]`` layout;
* ``_score_sweep``: the sweep over the feature axis that forms a ``[BL, BN]`` score tile
  ``s = qt @ x^T`` (and, for the backward, ``gp = gxp @ x^T`` from the same x tile). Every
  kernel path that recomputes scores (forward one-tile / tiled, backward one-tile / tiled)
  calls this one helper, so the four paths cannot drift apart.

Fully masked samples (``eos < 0`` with input checks off): no token is valid, the softmax is
0/0, and every path returns NaN for that sample's ``attn`` and pooled output, as the torch
backend (``torch.softmax`` over an all ``-inf`` row) and the published module do. An
``eos >= N`` keeps every token, as the torch backend's ``n > eos`` mask does.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; ``UPCAST`` (interpreter + bfloat16 only, whose bf16
    ``tl.dot`` is broken) multiplies in fp32 instead, so the rest of the bf16 path is testable."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _n_valid(EOS, b, N, HAS_EOS: tl.constexpr):
    """Tokens 0..eos of a text are valid, every token otherwise. Clamped in int64 before the
    int32 cast, so any out-of-range index (checks off) means the same as in the torch backend:
    ``eos < 0`` no token, ``eos >= N`` all of them."""
    if HAS_EOS:
        e = tl.load(EOS + b).to(tl.int64)
        return (tl.minimum(tl.maximum(e, -1), N - 1) + 1).to(tl.int32)
    else:
        return N


@triton.jit
def _xp_rows(offs_l, b, B, S):
    """Row of the head-major ``[Hh, B*S, D]`` layout holding slot ``l = h*S + s`` of sample b
    (int64: b is int64)."""
    return (offs_l // S) * (B * S) + b * S + offs_l % S


@triton.jit
def _score_sweep(QT, GXP, x_base, g_rows, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                 WITH_GP: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, X_EVICT: tl.constexpr):
    """One token tile's raw scores ``s = qt @ x^T`` [BL, BN] (fp32 accumulation, unscaled)
    and, with ``WITH_GP``, ``gp = gxp @ x^T`` from the same x tile (one x read for both).
    Lanes past ``vmask`` load zeros (never read from memory); callers mask them to -inf / 0.
    ``X_EVICT``: the x tiles' L2 eviction hint ("evict_last" where a second sweep re-reads them,
    "" for none; no default: Triton 3.4-3.7 cannot compile a nested call that leaves a string
    constexpr to its default; qt, read by every program, is always kept). ``gxp`` is loaded past L1 (``.cg``): in the one-launch
    backward other programs wrote it after the launch began."""
    x_rows = offs_n.to(tl.int64)[:, None] * stride_xn
    s = tl.zeros([BL, BN], tl.float32)
    gp = tl.zeros([BL, BN], tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        ldmask = lmask[:, None] & dmask[None, :]
        q = tl.load(QT + offs_l[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0, eviction_policy="evict_last")
        xt = tl.load(x_base + x_rows + offs_d[None, :] * stride_xd, mask=vmask[:, None] & dmask[None, :], other=0.0,
                     eviction_policy=X_EVICT)
        s = _dot(q, tl.trans(xt), s, DOT_PREC, UPCAST)
        if WITH_GP:
            g = tl.load(GXP + g_rows[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0, cache_modifier=".cg")
            gp = _dot(g, tl.trans(xt), gp, DOT_PREC, UPCAST)
    return s, gp


def next_pow2(n: int, lo: int = 16, hi=None) -> int:
    """Block size for an extent: the next power of two, at least ``lo`` (and at most ``hi``)."""
    v = max(lo, triton.next_power_of_2(int(n)))
    return v if hi is None else min(v, hi)


def _wide(t):
    """The refs' accumulation dtype: float64 stays float64 (a float64 truth), the rest float32."""
    import torch

    return t if t.dtype == torch.float64 else t.float()
