"""Forward Triton kernels of the SPARO read-out (absorbed formulation), with PyTorch refs.

Design (no loop over slots, no per-slot launch; docs/DESIGN.md, "The absorbed formulation")
--------------------------------------------------------------------------------------------
The op launches ``_fwd_fused_kernel`` (below): the two stages described here, pooling and
projection, as work items of one persistent launch, each row tile of pooled rows projected
right after its samples are pooled, while the rows are still in L2. ``_fwd_pool_kernel`` and
``_fwd_proj_kernel`` run the same two stages as two launches: the fused kernel's peers in the
tests (bitwise the same results) and the split that counts as the baseline in bench/NOTES.md.
Its programs are a share of one per SM (``sparo_readout_op._program_share``, timed on the GPU):
each keeps a sample in L2 between its two sweeps (``sample_bytes``), and 132 of them overflow a
50 MB L2 at ViT-L/14 (592 kB each with the tiled path's scores).

The key projection is folded into each slot's query, ``qt_l = W_K[h]^T q_l`` (a [L, D]
weight-only product, ``_absorb_kernel`` below, launched by the op; its gradient flows to
``q_emb`` and ``W_K`` through the backward's finish kernel); the ``1/sqrt(A)`` scale is a
kernel argument, not a second launch. With k and v sharing one weight, ``_absorb_kernel``
reads it with ``evict_last`` so that the projection finds it in L2 as ``W_V``. The
[B, N, Hh*A] keys and values are never built.

1. ``_fwd_pool_kernel``, grid ``(B, cdiv(L, BL))`` (in practice one program per sample: all
   L <= 128 slots in one block). Two code paths, chosen by the constexpr ``ONE_TILE``:

   * ``ONE_TILE`` (``BN = next_pow2(N)`` up to 256 tokens in fp16/bf16, 64 in fp32, at
     L = 64; ``autotune.pool_meta``): the whole [BL, BN] score block of a sample stays in
     registers (a 512-token block spills even at 16 warps, which cap registers at 128). One sweep
     over D computes ``s = qt @ x^T`` (fp32 accumulation, each ``qt`` tile loaded once per
     program), then the softmax runs in registers (exp2, scale folded in), ``attn`` is
     written once (only when ``NEED_WEIGHTS``), and a second sweep over D pools
     ``xp = p @ x`` (p cast to the compute dtype for the tensor-core product, fp32
     accumulation, as SDPA/FlashAttention do). No scratch: x is read twice (the second
     read mostly hits L2: one ViT-B/16 sample is 300 kB in bf16) and nothing else.
   * long sequences (``_fwd_tiled_*``): the token axis is tiled by ``BN``; pass (a) stores the
     scaled scores in an fp32 scratch ``[B, L, N]`` with an online max / sum-of-exp; pass (b),
     only when ``attn`` is asked for, writes ``attn = exp2(s - lse)`` for every token tile (a
     pass of its own: no store under a runtime branch inside the pipelined pooling loop, the
     pattern behind an earlier miscompile); pass (c), D tile by D tile, reads the scores back
     as ``p = exp2(s - lse)`` and pools.

   Both paths form their scores with the one ``_score_sweep`` helper of
   ``sparo_readout_common`` (shared with the backward). Token tiles past a text's EOS are
   never loaded (masked lanes, skipped tiles). A sample with no valid token (``eos < 0``,
   input checks off) gets NaN ``attn`` and ``xp`` rows on both paths, as ``torch.softmax``
   gives the torch backend. Saved for
   the backward: ``lse [B, L]`` (fp32, log2 domain of the scaled scores: ``p = exp2(s *
   scale * log2(e) - lse)``) instead of the [B, L, N] probabilities.
   ``xp`` is written **head-major**, ``[Hh, B*S, D]`` (row ``h, b*S + s`` for slot
   ``l = h*S + s``), the layout both consumers read (the value projection below and the
   backward's ``dW_V`` product): no permute copies.

2. ``_fwd_proj_kernel``, grid ``(cdiv(B*S, BM), Hh)``: the value projection is a different
   [D -> Vd] matrix per head, i.e. a grouped GEMM over the B*S pooled rows of each head
   (contiguous in the head-major ``xp``), fused with the shared [Vd -> V] output projection:
   ``o = xp W_V[h]^T + b_V[h]`` (kept in registers, also stored: the backward needs it for
   ``dW_O``), then ``out = o W_O^T + b_O``, V tiled by ``BVO``.

Why the projections are not fused into the pool program (counted; see bench/NOTES.md): a
program owns one sample, and each sample needs every head's ``W_V[h]`` ([L*Vd, D], 6.3 MB at
vit_b16 in bf16, 21x the sample's 0.3 MB of tokens). Per-sample fusion would request that
from L2 for every sample (1.6 GB per vit_b16 batch, 19x the forward floor), while the split
re-reads only ``xp`` (2 x 25 MB). The grouped GEMM amortises ``W_V[h]`` over BM samples.

Precision: fp16/bf16 inputs go to tensor-core dots with fp32 accumulation; softmax and all
reductions run in fp32. float32 inputs use ``input_precision="ieee"`` (true fp32, no TF32; the
tests fail a TF32 regression). Under the Triton CPU interpreter, casts from fp32 to bfloat16
truncate instead of rounding to nearest, so interpreted bf16 errors are about 2x a GPU's.

Offsets: every product of a token or row index with a stride is computed in int64 (the batch
index is int64 before it meets a stride, token indices are widened before multiplying), so
sequence-first ``[N, B, D]`` views with ``N * B * D >= 2^31`` address correctly.

Block sizes, warps and stages come from ``sparo_readout_autotune.py`` (pruned spaces keyed on the N bucket,
D, L and dtype, tuned by ``triton.autotune`` on a GPU, one fixed config under the interpreter).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .sparo_readout_common import LOG2E, _discard_span, _wide, _dot, _n_valid, _score_sweep, _xp_rows, next_pow2

@triton.jit
def _absorb_kernel(QE, WK, QT, S, A, D, BS: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr,
                   W_EVICT: tl.constexpr):
    """The absorbed query, unscaled: ``qt[h*S + s, d] = sum_a q_emb[h, s, a] W_K[h*A + a, d]``,
    grid ``(H, cdiv(D, BD))``, fp32 sums of products (S is a few slots per head: no tensor-core
    tile). ``W_EVICT``: "evict_last" when k and v share one weight, which the projection then
    reads again as ``W_V`` in the same pass (the L2 model counts 5 MB fewer at vit_b16 than with
    the PyTorch matmul this replaces, whose reads the pooling evicted)."""
    h = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BS)
    smask = offs_s < S
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = offs_d < D
    acc = tl.zeros([BS, BD], tl.float32)
    for a0 in range(0, A, BA):
        offs_a = a0 + tl.arange(0, BA)
        amask = offs_a < A
        q = tl.load(QE + (h * S + offs_s[:, None]) * A + offs_a[None, :], mask=smask[:, None] & amask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(WK + (h * A + offs_a[:, None]) * D + offs_d[None, :], mask=amask[:, None] & dmask[None, :],
                    other=0.0, eviction_policy=W_EVICT).to(tl.float32)
        acc += tl.sum(q[:, :, None] * w[None, :, :], axis=1)
    tl.store(QT + (h * S + offs_s[:, None]) * D + offs_d[None, :], acc.to(QT.dtype.element_ty),
             mask=smask[:, None] & dmask[None, :])


@triton.jit
def _fwd_pool_one_tile(X, QT, ATTN, LSE, XP, x_base, row_base, xp_rows, offs_l, lmask, n_valid, qk, b, N, D, L,
                       stride_xn, stride_xd, NEED_WEIGHTS: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr,
                       BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The whole [BL, BN] score block in registers: one score sweep, the softmax, attn, pooling."""
    offs_n = tl.arange(0, BN)
    vmask = offs_n < n_valid
    # x is read twice: kept in L2 by the score sweep (evict_last); the pooling sweep walks the
    # feature tiles backwards, starting on the most recently read ones, and loads them with no
    # hint: a tile is half a 128-byte line in fp16 at BD = 32, and evict_first on the first
    # half made the line the next victim before the sweep reached its other half (the L2
    # model counted those half-lines read twice). The pooled rows are kept (evict_last) until
    # the projection reads them (with no hint: PTX cannot combine evict_first with .cg, the
    # projection's L1 bypass), which returns them to the LRU order
    s, _ = _score_sweep(QT, QT, x_base, offs_l, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                        False, BL, BN, BD, DOT_PREC, UPCAST, "evict_last")
    s = tl.where(vmask[None, :], s * qk, float("-inf"))
    m = tl.max(s, axis=1)
    p = tl.exp2(s - m[:, None])  # no valid token: m = -inf, p = NaN (see sparo_readout_common)
    den = tl.sum(p, axis=1)
    p = p / den[:, None]
    tl.store(LSE + b * L + offs_l, m + tl.log2(den), mask=lmask)
    if NEED_WEIGHTS:
        tl.store(ATTN + row_base + offs_l[:, None] * N + offs_n[None, :], p.to(ATTN.dtype.element_ty),
                 mask=lmask[:, None] & (offs_n < N)[None, :])
    pc = p.to(X.dtype.element_ty)
    x_rows = offs_n.to(tl.int64)[:, None] * stride_xn
    nd = tl.cdiv(D, BD)
    for i in range(0, nd):
        offs_d = (nd - 1 - i) * BD + tl.arange(0, BD)
        dmask = offs_d < D
        xt = tl.load(x_base + x_rows + offs_d[None, :] * stride_xd, mask=vmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot(pc, xt, None, DOT_PREC, UPCAST)
        tl.store(XP + xp_rows[:, None] * D + offs_d[None, :], acc.to(XP.dtype.element_ty),
                 mask=lmask[:, None] & dmask[None, :], eviction_policy="evict_last")


@triton.jit
def _fwd_tiled_scores(QT, SCR, x_base, row_base, offs_l, lmask, n_valid, qk, N, D, stride_xn, stride_xd,
                      BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
    """Tiled pass (a): scaled scores of every valid token tile into the fp32 scratch, with an
    online max and sum of exp; returns the log2-domain log-sum-exp (-inf with no valid token)."""
    m_i = tl.full([BL], float("-inf"), tl.float32)
    l_i = tl.zeros([BL], tl.float32)
    for n0 in range(0, n_valid, BN):
        offs_n = n0 + tl.arange(0, BN)
        vmask = offs_n < n_valid
        s, _ = _score_sweep(QT, QT, x_base, offs_l, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                            False, BL, BN, BD, DOT_PREC, UPCAST, "")
        s = tl.where(vmask[None, :], s * qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
        tl.store(SCR + row_base + offs_l[:, None] * N + offs_n[None, :], s, mask=lmask[:, None] & vmask[None, :])
    return m_i + tl.log2(l_i)


@triton.jit
def _fwd_tiled_attn(SCR, ATTN, row_base, offs_l, lmask, lse, n_valid, N, BN: tl.constexpr):
    """Tiled pass (b), only when attn is asked for: ``attn = exp2(s - lse)`` for every token tile,
    a pass of its own (a store under a runtime branch inside the pipelined pooling loop is the
    pattern behind an earlier miscompile). Lanes past EOS read no scratch (masked to -inf): 0,
    or NaN for a sample with no valid token (lse = -inf), as in the torch backend."""
    for n0 in range(0, N, BN):
        offs_n = n0 + tl.arange(0, BN)
        vmask = offs_n < n_valid
        s = tl.load(SCR + row_base + offs_l[:, None] * N + offs_n[None, :], mask=lmask[:, None] & vmask[None, :],
                    other=float("-inf"))
        p = tl.exp2(s - lse[:, None])
        tl.store(ATTN + row_base + offs_l[:, None] * N + offs_n[None, :], p.to(ATTN.dtype.element_ty),
                 mask=lmask[:, None] & (offs_n < N)[None, :])


@triton.jit
def _fwd_tiled_pool(X, SCR, XP, x_base, row_base, xp_rows, offs_l, lmask, lse, n_valid, N, D, stride_xn, stride_xd,
                    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    """Tiled pass (c): ``xp = sum_n exp2(s - lse) x_n``, feature tile by feature tile."""
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        acc = tl.zeros([BL, BD], tl.float32)
        for n0 in range(0, n_valid, BN):
            offs_n = n0 + tl.arange(0, BN)
            vmask = offs_n < n_valid
            s = tl.load(SCR + row_base + offs_l[:, None] * N + offs_n[None, :],
                        mask=lmask[:, None] & vmask[None, :], other=float("-inf"))
            p = tl.where(vmask[None, :], tl.exp2(s - lse[:, None]), 0.0)
            xt = tl.load(x_base + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=vmask[:, None] & dmask[None, :], other=0.0)
            acc = _dot(p.to(xt.dtype), xt, acc, DOT_PREC, UPCAST)
        acc = tl.where(n_valid > 0, acc, float("nan"))  # no valid token: 0/0, as on the one-tile path
        tl.store(XP + xp_rows[:, None] * D + offs_d[None, :], acc.to(XP.dtype.element_ty),
                 mask=lmask[:, None] & dmask[None, :])


@triton.jit
def _pool_sample(X, EOS, QT, SCR, ATTN, LSE, XP, b, scale, B, N, D, L, S, stride_xb, stride_xn, stride_xd,
                 HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ONE_TILE: tl.constexpr, BL: tl.constexpr,
                 BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                 DISCARD: tl.constexpr):
    """Softmax pooling of sample ``b`` (int64) for all slots (``BL`` covers them): lse, attn, xp.
    ``DISCARD``: the tiled path's scores, dead after the pooling pass, leave L2 unwritten."""
    offs_l = tl.arange(0, BL)
    lmask = offs_l < L
    x_base = X + b * stride_xb
    row_base = b * L * N  # attn / scratch rows of this sample: [L, N] contiguous
    n_valid = _n_valid(EOS, b, N, HAS_EOS)
    qk = scale * 1.4426950408889634  # scores in the log2 domain: softmax with exp2
    xp_rows = _xp_rows(offs_l, b, B, S)
    if ONE_TILE:
        _fwd_pool_one_tile(X, QT, ATTN, LSE, XP, x_base, row_base, xp_rows, offs_l, lmask, n_valid, qk, b, N, D, L,
                           stride_xn, stride_xd, NEED_WEIGHTS, BL, BN, BD, DOT_PREC, UPCAST)
    else:
        lse = _fwd_tiled_scores(QT, SCR, x_base, row_base, offs_l, lmask, n_valid, qk, N, D, stride_xn, stride_xd,
                                BL, BN, BD, DOT_PREC, UPCAST)
        tl.store(LSE + b * L + offs_l, lse, mask=lmask)
        tl.debug_barrier()  # scratch written by one thread is read back by another below
        if NEED_WEIGHTS:
            _fwd_tiled_attn(SCR, ATTN, row_base, offs_l, lmask, lse, n_valid, N, BN)
        _fwd_tiled_pool(X, SCR, XP, x_base, row_base, xp_rows, offs_l, lmask, lse, n_valid, N, D, stride_xn,
                        stride_xd, BL, BN, BD, DOT_PREC, UPCAST)
        _discard_span(SCR + row_base, L * N, DISCARD)


@triton.jit
def _fwd_pool_kernel(
    X, EOS, QT, SCR, ATTN, LSE, XP,
    scale, B, N, D, L, S,
    stride_xb, stride_xn, stride_xd,
    HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ONE_TILE: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr = False, DISCARD: tl.constexpr = False,
):
    """Softmax pooling of one sample's tokens for all slots (grid ``(B,)``: ``BL`` covers every slot)."""
    _pool_sample(X, EOS, QT, SCR, ATTN, LSE, XP, tl.program_id(0).to(tl.int64), scale, B, N, D, L, S,
                 stride_xb, stride_xn, stride_xd, HAS_EOS, NEED_WEIGHTS, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST,
                 DISCARD)


@triton.jit
def _proj_tile(XP, WV, BV, WO, BO, O, OUT, pid_m, h, M, S, L, D, VD, V, BM: tl.constexpr, BD: tl.constexpr,
               BVD: tl.constexpr, BVO: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               XP_CACHE: tl.constexpr):
    """Rows ``pid_m * BM ...`` of head ``h`` (int64): ``o = xp W_V[h]^T + b_V[h]``, ``out = o W_O^T + b_O``."""
    offs_m = pid_m * BM + tl.arange(0, BM)  # row r = b * S + s of this head's slots
    mmask = offs_m < M
    xrow = h * M + offs_m  # head-major xp: the head's rows are contiguous
    bidx = (offs_m // S).to(tl.int64)
    row = bidx * L + h * S + offs_m % S  # row of [B*L, .] tensors
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    acc = tl.zeros([BM, BVD], tl.float32)
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        xp = tl.load(XP + xrow[:, None] * D + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0,
                     cache_modifier=XP_CACHE)
        # [BD, BVD] = W_V[h]^T tile, kept: every row tile of the head reads it again
        wv = tl.load(WV + (h * VD + offs_vd)[None, :] * D + offs_d[:, None],
                     mask=vdmask[None, :] & dmask[:, None], other=0.0, eviction_policy="evict_last")
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


@triton.jit
def _fwd_proj_kernel(
    XP, WV, BV, WO, BO, O, OUT,
    M, S, L, D, VD, V,
    BM: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr, BVO: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr = False,
):
    _proj_tile(XP, WV, BV, WO, BO, O, OUT, tl.program_id(0), tl.program_id(1).to(tl.int64), M, S, L, D, VD, V,
               BM, BD, BVD, BVO, DOT_PREC, UPCAST, "")



@triton.jit
def _wait_samples(SYNC, pid_m, M, S, BM: tl.constexpr):
    """Spin until every sample with rows in row tile ``pid_m`` is pooled (``SYNC[1 + b]`` set).
    The acquiring atomics order the pooled rows' stores (released by their producer) before
    this program's loads; the barrier hands that to every thread of the program."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    flags = SYNC + 1 + offs_m // S
    # the loop carries a scalar (a tensor-carrying spin loop broke Triton 3.8's layout pass)
    ready = tl.min(tl.where(mmask, tl.atomic_add(flags, 0, mask=mmask, sem="acquire"), 1), axis=0)
    while ready == 0:
        ready = tl.min(tl.where(mmask, tl.atomic_add(flags, 0, mask=mmask, sem="acquire"), 1), axis=0)
    tl.debug_barrier()


@triton.jit
def _first_ticket(SYNC, TICKETS: tl.constexpr):
    """A persistent program's first work item (``TICKETS``: from the counter ``SYNC[0]``), or,
    with one program per item, the program's own."""
    if TICKETS:
        return tl.atomic_add(SYNC, 1)
    else:
        return tl.program_id(0)


@triton.jit
def _next_ticket(SYNC, end, TICKETS: tl.constexpr):
    """The next work item (``end``, which ends every loop, for a program with one item)."""
    if TICKETS:
        return tl.atomic_add(SYNC, 1)
    else:
        return end + 0 * tl.program_id(0)


@triton.jit
def _pooled(r, B, M, S, BM: tl.constexpr):
    """Samples with rows in the row tiles before tile ``r``."""
    return tl.minimum(B, tl.cdiv(tl.minimum(M, r * BM), S))


@triton.jit
def _fused_item(t, B, M, S, H, BM: tl.constexpr):
    """Ticket ``t`` -> work item of ``_fwd_fused_kernel`` (``fused_schedule`` in closed form): round
    r pools the samples of row tile r, then projects row tile r - 1 (H items)."""
    r = t * 0
    while _pooled(r + 1, B, M, S, BM) + H * r <= t:  # the start of round r + 1
        r += 1
    o = t - (_pooled(r, B, M, S, BM) + H * tl.maximum(r - 1, 0))
    npool = _pooled(r + 1, B, M, S, BM) - _pooled(r, B, M, S, BM)
    return tl.where(o < npool, _pooled(r, B, M, S, BM) + o, -((r - 1) * H + (o - npool)) - 1)


@triton.jit
def _fwd_fused_kernel(
    X, EOS, QT, SCR, ATTN, LSE, XP, WV, BV, WO, BO, O, OUT, SYNC,
    scale, B, N, D, L, S, H, VD, V,
    stride_xb, stride_xn, stride_xd,
    HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr, ONE_TILE: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BDP: tl.constexpr,
    BVD: tl.constexpr, BVO: tl.constexpr, DOT_PREC: tl.constexpr, TICKETS: tl.constexpr = True,
    UPCAST: tl.constexpr = False, DISCARD: tl.constexpr = False,
):
    """Pooling and projections in one persistent launch (grid ``(P,)``), so that each chunk of
    pooled rows is projected while it is still in L2. Work items come from one ticket counter
    (``SYNC[0]``) in the order of ``fused_schedule`` (``_fused_item``): ``item >= 0`` pools sample
    ``item``, ``item < 0`` projects row tile ``(-item - 1) // H`` of head ``(-item - 1) % H``.
    The order lists every sample before the row tiles that read it, so a projection waits only
    for samples whose tickets are already taken by running programs: no deadlock however many
    programs are resident, and under the CPU interpreter (programs run one after another, the
    first one takes every ticket in order) no wait ever spins. Without ``TICKETS`` (the
    interpreter's default, ``sparo_readout_op.INTERPRETER_TICKETS``) the grid has one program per
    item, program t running item t, and nothing waits: the interpreter runs programs in grid
    order, which is the work order (and an L2 model that records only some programs never
    meets a wait for one it skipped); the programs are those an L2 model interleaves as a GPU
    runs them. ``DISCARD``: the tiled path's scores are dropped from L2 after their last read."""
    M = B * S
    NT = B + H * tl.cdiv(M, BM)
    t = _first_ticket(SYNC, TICKETS)
    while t < NT:
        item = _fused_item(t, B, M, S, H, BM)
        if item >= 0:
            b = item.to(tl.int64)
            _pool_sample(X, EOS, QT, SCR, ATTN, LSE, XP, b, scale, B, N, D, L, S, stride_xb, stride_xn, stride_xd,
                         HAS_EOS, NEED_WEIGHTS, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST, DISCARD)
            if TICKETS:
                tl.debug_barrier()  # every thread's xp stores precede the release below
                tl.atomic_add(SYNC + 1 + b, 1, sem="release")
        else:
            tile = -item - 1
            pid_m = tile // H
            if TICKETS:
                _wait_samples(SYNC, pid_m, M, S, BM)
            # .cg: the pooled rows were written by other SMs after this launch began; never L1
            _proj_tile(XP, WV, BV, WO, BO, O, OUT, pid_m, (tile % H).to(tl.int64), M, S, L, D, VD, V,
                       BM, BDP, BVD, BVO, DOT_PREC, UPCAST, ".cg")
        t = _next_ticket(SYNC, NT, TICKETS)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: true fp32 ("ieee") for float32, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


_p2 = next_pow2  # the autotune module's name for it


def sample_bytes(L: int, N: int, D: int, itemsize: int, tiled: bool) -> int:
    """Bytes one pool item keeps in L2 while it works on a sample: the sample's x (re-read by the
    second sweep) and the tiled path's fp32 scores (read back by the pooling pass)."""
    return N * D * itemsize + (L * N * 4 if tiled else 0)


def fused_schedule(B: int, S: int, H: int, BM: int, lag: int = 1) -> list:
    """The work order of ``_fwd_fused_kernel`` (computed there by ``_fused_item``, lag 1): samples
    in order, and the H projection tiles of row tile k right after the samples of row tile
    ``k + lag`` (so a projection seldom waits, and its rows were written about one chunk of
    samples earlier: still in L2)."""
    M = B * S
    tiles = -(-M // BM)
    order, pooled = [], 0
    for k in range(tiles + lag):
        if k < tiles:
            last = min(B, -(-min(M, (k + 1) * BM) // S))  # samples with rows in tile k
            order += range(pooled, last)
            pooled = max(pooled, last)
        if k >= lag:
            order += [-((k - lag) * H + h) - 1 for h in range(H)]
    return order


# ----------------------------------------------------------------------------- refs
def absorb_ref(q_emb: Tensor, k_weight: Tensor) -> Tensor:
    """PyTorch reference of ``_absorb_kernel``: the unscaled absorbed query [H*S, D]."""
    _, H, S, _, A = q_emb.shape
    return (_wide(q_emb).reshape(H, S, A) @ _wide(k_weight).view(H, A, -1)).reshape(H * S, -1).to(k_weight.dtype)


def fwd_pool_ref(x: Tensor, eos_indices: Optional[Tensor], qt: Tensor, scale: float,
                 num_heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """PyTorch reference of ``_fwd_pool_kernel``: (p fp32 [B, L, N], lse [B, L] (log2 domain),
    xp head-major [Hh, B*S, D])."""
    B = x.shape[0]
    s = torch.einsum("ld,bnd->bln", _wide(qt), _wide(x)) * (scale * LOG2E)
    if eos_indices is not None:
        n = torch.arange(x.shape[1], device=x.device)
        s = s.masked_fill((n[None, :] > eos_indices[:, None])[:, None, :], float("-inf"))
    lse = torch.logsumexp(s / LOG2E, dim=-1) * LOG2E
    p = torch.exp2(s - lse[..., None])
    xp = torch.matmul(p, _wide(x)).to(x.dtype)  # [B, L, D]
    return p, lse, to_head_major(xp, num_heads)


def to_head_major(t: Tensor, num_heads: int) -> Tensor:
    """[B, L, C] -> [Hh, B*S, C] (slot l = h*S + s)."""
    B, L, C = t.shape
    return t.reshape(B, num_heads, L // num_heads, C).permute(1, 0, 2, 3).reshape(num_heads, -1, C)


def fwd_proj_ref(xp_h: Tensor, v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor,
                 proj_bias: Tensor, num_heads: int, B: int) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``_fwd_proj_kernel`` on head-major xp: (o [B, L, Vd], out [B, L, V])."""
    H, BS, D = xp_h.shape
    vd = v_weight.shape[0] // H
    o = torch.bmm(xp_h, v_weight.view(H, vd, D).transpose(1, 2)) + v_bias.view(H, 1, vd)  # [H, B*S, Vd]
    o = o.reshape(H, B, BS // B, vd).permute(1, 0, 2, 3).reshape(B, -1, vd)
    return o, torch.nn.functional.linear(o, proj_weight, proj_bias)


def from_head_major(t: Tensor, batch: int) -> Tensor:
    """[Hh, B*S, C] -> [B, L, C] (the inverse of ``to_head_major``)."""
    H, M, C = t.shape
    return t.reshape(H, batch, M // batch, C).permute(1, 0, 2, 3).reshape(batch, -1, C)
