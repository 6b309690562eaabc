"""Backward Triton kernel of the SPARO read-out (token-level work), with a PyTorch ref.

With g = dL/dout and ga = dL/dattn (optional), the slot-level products are small GEMMs that
run in PyTorch (cuBLAS) around the kernel (see ``ops.py``)::

    go = g W_O,  dW_O = sum g^T o,  db_O = sum g
    gxp[b, l] = W_V[h]^T go[b, l],  dW_V[h] = sum go xp^T,  db_V[h] = sum go

``_bwd_token_kernel`` does everything that touches the tokens, for every slot at once
(all L <= 128 slots in one block), grid ``(P,)`` with each program owning G consecutive
batch elements (P = cdiv(B, G), G chosen so that P is about two waves of the GPU):

1. per sample, sweep the tokens (up to EOS for texts; dx is zero past it):
   ``gp = gxp @ x^T (+ ga)`` (D tiled, fp32 accumulation), ``delta_l = sum_n p gp`` (exact
   even when a gradient arrives through attn), the raw ``gp`` parked in an fp32 scratch
   [B, L, N]; a second sweep turns it into
   ``gs = p * (gp - delta)`` in place;
2. D tile by D tile, sweep samples and token tiles:
   ``dx[n, d] = sum_l p[l, n] gxp[l, d] + sum_l gs[l, n] qt[l, d]`` (written once, no
   atomics) and ``dqt_part[pid, l, d] += sum_n gs[l, n] x[n, d]`` accumulated in registers
   over the program's samples and tokens and stored once.

Determinism: there are no atomics; the batch-wide reduction ``dqt = dqt_part.sum(0)`` is a
PyTorch sum over the P per-program partials (fp32), so the result is bitwise reproducible
for a given (B, device). The key bias gets an exactly-zero gradient (it only adds a
per-slot constant to the scores, which the softmax cancels).

Saved from the forward: x, p (fp32 softmax, [B, L, N]), xp ([B, L, D]) and o ([B, L, Vd]),
i.e. x plus O(B*L*(N+D)) state. Precision as in the forward: fp16/bf16 operands on tensor
cores with fp32 accumulation (p and gs cast to the compute dtype for the dots, as
FlashAttention does), float32 with ``input_precision="ieee"``.

Blocks (``bwd_config``): all L slots x 32 tokens x 64 features (32 in float32), 8 warps;
checked with ``python -m sparo_fast_kernels.aot_check`` (sm_90, no GPU needed): no spills at
the benchmark shapes, a few spilled bytes at L > 64. Not timed on a GPU yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .sparo_fwd import _dot, _p2


@triton.jit
def _bwd_token_kernel(
    X, EOS, P, GA, GXP, QT, GS, DX, DQT,
    B, N, D, L, G,
    stride_xb, stride_xn, stride_xd,
    stride_gab, stride_gal, stride_gan,
    HAS_EOS: tl.constexpr, HAS_GA: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    pid = tl.program_id(0)
    offs_l = tl.arange(0, BL)
    lmask = offs_l < L
    b_start = pid.to(tl.int64) * G

    # 1. gp, delta, gs (per sample)
    for bi in range(0, G):
        b = b_start + bi
        if b < B:
            x_base = X + b * stride_xb
            row_base = b * L * N
            if HAS_EOS:  # p = 0 past EOS: those tiles are skipped (dx = 0 there)
                n_valid = tl.minimum(tl.load(EOS + b).to(tl.int32) + 1, N)
            else:
                n_valid = N
            delta = tl.zeros([BL], tl.float32)
            for n0 in range(0, n_valid, BN):
                offs_n = n0 + tl.arange(0, BN)
                nmask = offs_n < N
                msk = lmask[:, None] & nmask[None, :]
                gp = tl.zeros([BL, BN], tl.float32)
                for d0 in range(0, D, BD):
                    offs_d = d0 + tl.arange(0, BD)
                    dmask = offs_d < D
                    g = tl.load(GXP + b * L * D + offs_l[:, None] * D + offs_d[None, :],
                                mask=lmask[:, None] & dmask[None, :], other=0.0)
                    xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                                 mask=nmask[:, None] & dmask[None, :], other=0.0)
                    gp = _dot(g, tl.trans(xt), gp, DOT_PREC, UPCAST)
                if HAS_GA:
                    ga = tl.load(GA + b * stride_gab + offs_l[:, None] * stride_gal + offs_n[None, :] * stride_gan,
                                 mask=msk, other=0.0)
                    gp += ga.to(tl.float32)
                p = tl.load(P + row_base + offs_l[:, None] * N + offs_n[None, :], mask=msk, other=0.0)
                delta += tl.sum(p * gp, axis=1)
                tl.store(GS + row_base + offs_l[:, None] * N + offs_n[None, :], gp, mask=msk)
            tl.debug_barrier()
            for n0 in range(0, n_valid, BN):
                offs_n = n0 + tl.arange(0, BN)
                msk = lmask[:, None] & (offs_n < N)[None, :]
                ptrs = row_base + offs_l[:, None] * N + offs_n[None, :]
                p = tl.load(P + ptrs, mask=msk, other=0.0)
                gp = tl.load(GS + ptrs, mask=msk, other=0.0)
                tl.store(GS + ptrs, p * (gp - delta[:, None]), mask=msk)
    tl.debug_barrier()

    # 2. dx and the dqt partial, D tile by D tile
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        ldmask = lmask[:, None] & dmask[None, :]
        qt = tl.load(QT + offs_l[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0)
        dq = tl.zeros([BL, BD], tl.float32)
        for bi in range(0, G):
            b = b_start + bi
            if b < B:
                x_base = X + b * stride_xb
                row_base = b * L * N
                g = tl.load(GXP + b * L * D + offs_l[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0)
                if HAS_EOS:
                    n_valid = tl.minimum(tl.load(EOS + b).to(tl.int32) + 1, N)
                else:
                    n_valid = N
                for n0 in range(0, n_valid, BN):
                    offs_n = n0 + tl.arange(0, BN)
                    nmask = offs_n < N
                    msk = lmask[:, None] & nmask[None, :]
                    p = tl.load(P + row_base + offs_l[:, None] * N + offs_n[None, :], mask=msk, other=0.0)
                    gs = tl.load(GS + row_base + offs_l[:, None] * N + offs_n[None, :], mask=msk, other=0.0)
                    xt = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                                 mask=nmask[:, None] & dmask[None, :], other=0.0)
                    gs_c = gs.to(xt.dtype)
                    dx = _dot(tl.trans(p.to(xt.dtype)), g, None, DOT_PREC, UPCAST)
                    dx = _dot(tl.trans(gs_c), qt, dx, DOT_PREC, UPCAST)
                    tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
                             mask=nmask[:, None] & dmask[None, :])
                    dq = _dot(gs_c, xt, dq, DOT_PREC, UPCAST)
                if HAS_EOS:  # tiles wholly past EOS: dx = 0
                    zero = tl.zeros([BN, BD], DX.dtype.element_ty)
                    for n0 in range(tl.cdiv(n_valid, BN) * BN, N, BN):
                        offs_n = n0 + tl.arange(0, BN)
                        tl.store(DX + b * N * D + offs_n[:, None] * D + offs_d[None, :], zero,
                                 mask=(offs_n < N)[:, None] & dmask[None, :])
        tl.store(DQT + pid.to(tl.int64) * L * D + offs_l[:, None] * D + offs_d[None, :], dq, mask=ldmask)


def bwd_config(L: int, N: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes and warps of ``_bwd_token_kernel`` (checked spill-free with ptxas for sm_90)."""
    BL = _p2(L)
    if BL > 64:
        return dict(BL=BL, BN=_p2(N, hi=16), BD=_p2(D, hi=16), num_warps=8)  # small spills (ptxas)
    half = dtype != torch.float32
    return dict(BL=BL, BN=_p2(N, hi=32), BD=_p2(D, hi=64 if half or BL < 64 else 32),
                num_warps=8)


#: Tests set this to force several samples per program (the CPU default is one).
GROUP_OVERRIDE: Optional[int] = None


def batch_group(B: int, device: torch.device) -> int:
    """Samples per program: about two waves of programs on a GPU, one per sample on CPU."""
    if GROUP_OVERRIDE is not None:
        return GROUP_OVERRIDE
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, triton.cdiv(B, 2 * sms))


# ----------------------------------------------------------------------------- ref
def bwd_token_ref(x: Tensor, p: Tensor, ga: Optional[Tensor], gxp: Tensor, qt: Tensor) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``_bwd_token_kernel`` (after the partial sum): (dx, dqt fp32)."""
    xf, gxf = x.float(), gxp.float()
    gp = torch.einsum("bld,bnd->bln", gxf, xf)
    if ga is not None:
        gp = gp + ga.float()
    gs = p * (gp - (p * gp).sum(-1, keepdim=True))
    dx = torch.einsum("bln,bld->bnd", p, gxf) + torch.einsum("bln,ld->bnd", gs, qt.float())
    dqt = torch.einsum("bln,bnd->ld", gs, xf)
    return dx.to(x.dtype), dqt
