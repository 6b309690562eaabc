"""Forward Triton kernels of the SPARO read-out (absorbed formulation), with PyTorch refs.

Design (two launches, no loop over slots, no per-slot launch; see ``shared/SPARO.md``)
---------------------------------------------------------------------------------------
The key projection is folded into each slot's query, ``qt_l = W_K[h]^T q_l / sqrt(A)``
(a [L, D] weight-only product, computed by PyTorch outside the kernels and differentiated
by autograd), so the [B, N, Hh*A] keys and values are never built.

1. ``_fwd_pool_kernel``, grid ``(B, cdiv(L, BL))``: for one batch element and a block of
   (up to 64) slots it

   a. sweeps the tokens up to EOS in tiles of ``BN`` (tiles past a text's EOS are skipped
      in every sweep, forward and backward): scores ``s = qt @ x^T`` (the feature axis D
      is tiled by ``BD`` and accumulated in fp32), eos mask, online max / sum-of-exp; the
      raw fp32 scores go to the ``p`` buffer [B, L, N];
   b. sweeps ``p`` again and normalises it in place (fp32 softmax), writing ``attn``
      (compute dtype) only when ``NEED_WEIGHTS``;
   c. pools, D tile by D tile: ``xp[b, l, d] = sum_n p[l, n] x[n, d]`` (p cast to the
      compute dtype for the tensor-core dot, fp32 accumulation, as SDPA/FlashAttention do).

   x is read twice per program (a and c; the second read mostly hits L2: one sample of
   ViT-B/16 is 300 kB in bf16). A one-pass online-softmax pooling would need a
   [BL, D] fp32 accumulator (192 kB at L=64, D=768), more than a CTA's registers.
   The bias term ``c_l = q_l . b_K / sqrt(A)`` cancels in the softmax and is omitted.

2. ``_fwd_proj_kernel``, grid ``(cdiv(B*S, BM), Hh)``: the value projection is a different
   [D -> Vd] matrix per head, i.e. a grouped GEMM over the B*S pooled rows of each head,
   fused with the shared [Vd -> V] output projection: ``o = xp W_V[h]^T + b_V[h]``
   (kept in registers, also stored: the backward needs it for dW_O), then
   ``out = o W_O^T + b_O``, V tiled by ``BV``.

Precision: fp16/bf16 inputs go to tensor-core dots with fp32 accumulation; softmax and
all reductions run in fp32. float32 inputs use ``input_precision="ieee"`` (true fp32, no
TF32) so that the float32 backend stays within 1e-3 of the float64 reference; this costs
speed in float32 only (the forward is memory-bound in bf16, the target dtype).

Under the Triton CPU interpreter, casts from fp32 to bfloat16 truncate instead of rounding to
nearest (checked: the interpreted pooled rows equal a truncating emulation bit for bit), so
interpreted bf16 errors are about 2x those of a GPU or of PyTorch's bf16 ops; GPU casts round.

Block sizes are powers of two >= 16 (``tl.dot`` needs >= 16 on GPU), chosen from the
shape and dtype by ``triton.next_power_of_2`` with masks for every ragged edge. There is no
autotuning: the configs were picked without a GPU, by compiling the kernels for sm_90
(``triton.compile`` with a ``GPUTarget``, see ``tests/test_triton_compile.py``) and keeping
register use below 255 without spills (``ptxas -v``); they are not timed yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; ``UPCAST`` (interpreter + bfloat16 only, whose bf16
    ``tl.dot`` is broken) multiplies in fp32 instead, so the rest of the bf16 path is testable."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _fwd_pool_kernel(
    X, EOS, QT, P, ATTN, XP,
    N, D, L,
    stride_xb, stride_xn, stride_xd,
    HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    lb = tl.program_id(1)
    offs_l = lb * BL + tl.arange(0, BL)
    lmask = offs_l < L
    x_base = X + b * stride_xb
    row_base = b * L * N  # p / attn rows of this sample: [L, N] contiguous
    if HAS_EOS:  # tokens after EOS: masked; whole tiles past it are skipped
        n_valid = tl.minimum(tl.load(EOS + b).to(tl.int32) + 1, N)
    else:
        n_valid = N

    # (a) scores, online max and sum of exp
    m_i = tl.full([BL], float("-inf"), tl.float32)
    l_i = tl.zeros([BL], tl.float32)
    for n0 in range(0, n_valid, BN):
        offs_n = n0 + tl.arange(0, BN)
        nmask = offs_n < N
        s = tl.zeros([BL, BN], tl.float32)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            dmask = offs_d < D
            q = tl.load(QT + offs_l[:, None] * D + offs_d[None, :],
                        mask=lmask[:, None] & dmask[None, :], other=0.0)
            xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=nmask[:, None] & dmask[None, :], other=0.0)
            s = _dot(q, tl.trans(xt), s, DOT_PREC, UPCAST)
        s = tl.where((offs_n < n_valid)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
        tl.store(P + row_base + offs_l[:, None] * N + offs_n[None, :], s,
                 mask=lmask[:, None] & nmask[None, :])
    tl.debug_barrier()

    # (b) normalise in place (fp32) and write attn
    inv_l = 1.0 / l_i
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        msk = lmask[:, None] & (offs_n < N)[None, :]
        ptrs = row_base + offs_l[:, None] * N + offs_n[None, :]
        s = tl.load(P + ptrs, mask=msk & (offs_n < n_valid)[None, :], other=float("-inf"))
        p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
        tl.store(P + ptrs, p, mask=msk)
        if NEED_WEIGHTS:
            tl.store(ATTN + ptrs, p.to(ATTN.dtype.element_ty), mask=msk)
    tl.debug_barrier()

    # (c) pooling xp = p @ x, D tile by D tile
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        acc = tl.zeros([BL, BD], tl.float32)
        for n0 in range(0, n_valid, BN):
            offs_n = n0 + tl.arange(0, BN)
            nmask = offs_n < N
            p = tl.load(P + row_base + offs_l[:, None] * N + offs_n[None, :],
                        mask=lmask[:, None] & nmask[None, :], other=0.0)
            xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = _dot(p.to(xt.dtype), xt, acc, DOT_PREC, UPCAST)
        tl.store(XP + b * L * D + offs_l[:, None] * D + offs_d[None, :], acc.to(XP.dtype.element_ty),
                 mask=lmask[:, None] & dmask[None, :])


@triton.jit
def _fwd_proj_kernel(
    XP, WV, BV, WO, BO, O, OUT,
    M, S, L, D, VD, V,
    BM: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr, BVO: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)  # row r = b * S + s of this head's slots
    mmask = offs_m < M
    bidx = (offs_m // S).to(tl.int64)
    row = bidx * L + h * S + offs_m % S  # row of [B*L, .] tensors
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    acc = tl.zeros([BM, BVD], tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        xp = tl.load(XP + row[:, None] * D + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        wv = tl.load(WV + (h * VD + offs_vd)[None, :] * D + offs_d[:, None],
                     mask=vdmask[None, :] & dmask[:, None], other=0.0)  # [BD, BVD] = W_V[h]^T tile
        acc = _dot(xp, wv, acc, DOT_PREC, UPCAST)
    bv = tl.load(BV + h * VD + offs_vd, mask=vdmask, other=0.0).to(tl.float32)
    o = (acc + bv[None, :]).to(O.dtype.element_ty)
    tl.store(O + row[:, None] * VD + offs_vd[None, :], o, mask=mmask[:, None] & vdmask[None, :])
    for v0 in range(0, V, BVO):
        offs_v = v0 + tl.arange(0, BVO)
        vmask = offs_v < V
        wo = tl.load(WO + offs_v[None, :] * VD + offs_vd[:, None],
                     mask=vmask[None, :] & vdmask[:, None], other=0.0)  # [BVD, BVO] = W_O^T tile
        y = _dot(o, wo, None, DOT_PREC, UPCAST)
        bo = tl.load(BO + offs_v, mask=vmask, other=0.0).to(tl.float32)
        y = y + bo[None, :]
        tl.store(OUT + row[:, None] * V + offs_v[None, :], y.to(OUT.dtype.element_ty),
                 mask=mmask[:, None] & vmask[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: true fp32 ("ieee") for float32, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _p2(n: int, lo: int = 16, hi: Optional[int] = None) -> int:
    v = max(lo, triton.next_power_of_2(int(n)))
    return v if hi is None else min(v, hi)


def pool_config(L: int, N: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of ``_fwd_pool_kernel`` (checked spill-free with ptxas for sm_90)."""
    half = dtype != torch.float32
    BL = _p2(L, hi=64)
    return dict(BL=BL, BN=_p2(N, hi=32), BD=_p2(D, hi=64 if half else 32), num_warps=8 if BL >= 64 else 4)


def proj_config(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of ``_fwd_proj_kernel`` (checked spill-free with ptxas for sm_90)."""
    half = dtype != torch.float32
    BVD = _p2(VD)
    b = 64 if half and BVD <= 64 else 32
    return dict(BM=_p2(M, hi=b), BD=_p2(D, hi=b), BVD=BVD, BVO=_p2(V, hi=64 if half else 32), num_warps=8)


# ----------------------------------------------------------------------------- refs
def fwd_pool_ref(x: Tensor, eos_indices: Optional[Tensor], qt: Tensor) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``_fwd_pool_kernel``: (p fp32 [B, L, N], xp [B, L, D])."""
    s = torch.einsum("ld,bnd->bln", qt.float(), x.float())
    if eos_indices is not None:
        n = torch.arange(x.shape[1], device=x.device)
        s = s.masked_fill((n[None, :] > eos_indices[:, None])[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    xp = torch.matmul(p, x.float()).to(x.dtype)
    return p, xp


def fwd_proj_ref(xp: Tensor, v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor,
                 proj_bias: Tensor, num_heads: int) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``_fwd_proj_kernel``: (o [B, L, Vd], out [B, L, V])."""
    B, L, D = xp.shape
    vd = v_weight.shape[0] // num_heads
    w = v_weight.view(num_heads, vd, D).repeat_interleave(L // num_heads, dim=0)  # [L, Vd, D]
    o = torch.einsum("bld,lvd->blv", xp, w) + v_bias.view(num_heads, vd).repeat_interleave(L // num_heads, 0)
    return o, torch.nn.functional.linear(o, proj_weight, proj_bias)
