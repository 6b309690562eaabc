"""Backward Triton kernels of the SPARO read-out: three stages, each with a PyTorch ``*_ref``.

The op launches ``_bwd_fused_kernel``: the three stages below as work items of one persistent
launch off one ticket counter (per round of P samples one gxp item per head and one owner item
per sample, then the batch sums, then the finish tiles), so that gxp, dW_V and the dqt
partials are read back by the launch that wrote them, each round's gxp while it is in L2; dead
scratch is dropped from L2 without a write-back (``sparo_readout_common._discard_lines``). The three
kernels run the same stages as three launches: the fused kernel's peers in the tests (bitwise
the same results).

With g = dL/dout and ga = dL/dattn (optional); ``xp`` and ``gxp`` are head-major
``[Hh, B*S, D]`` (the layout every kernel reads, no permute copies):

1. ``_bwd_slot_kernel``, grid ``(Hh, cdiv(D, BD))``: the slot-level products,
   ``go = g W_O``, ``gxp[h] = go[h] W_V[h]``, ``dW_V[h] = go[h]^T xp[h]``, ``db_V[h] = sum go[h]``
   and per-head partials of ``dW_O = sum g^T o`` and ``db_O = sum g``;
2. ``_bwd_token_kernel`` (below): everything that touches the tokens;
3. ``_bwd_finish_kernel``, grid ``(Hh, cdiv(D, BD))``: the batch-wide ``dqt`` reduction of
   one head's feature tile (the per-program partials summed BP at a time with vector loads, in
   a fixed order), then the absorbed query's gradients: the ``dW_K[h]`` tile ``q^T dqt`` (plus
   ``dW_V[h]`` when k and v share one weight), a per-tile fp32 partial of ``dq = dqt W_K[h]^T``
   (summed over the feature tiles by one PyTorch ``sum`` in the op), and rows of ``dW_O``,
   ``db_O``. (The earlier grid ``(Hh,)`` walked every feature tile and every partial in one
   program: about 1,600 dependent round trips each; see bench/NOTES.md.)

``_bwd_token_kernel`` does everything that touches the tokens, for every slot at once (all
L <= 128 slots in one block). It is **persistent**: grid ``(P,)`` with P about one program per
SM, program ``pid`` taking samples ``pid, pid + P, ...``. Per sample:

* ``ONE_TILE`` (``BN = next_pow2(N)`` up to 256 tokens in fp16/bf16, 32 in fp32, at L = 64): one sweep
  over D recomputes the scores ``s = qt @ x^T`` and ``gp = gxp @ x^T`` from the same x tile
  (the probabilities are not saved by the forward: ``p = exp2(s * scale * log2(e) - lse)``
  from the saved fp32 ``lse [B, L]``), then in registers ``delta = sum_n p (gp + ga)``
  (exact even when a gradient arrives through attn) and ``gs = p * (gp + ga - delta)``;
  a second sweep over D, with 64+-row ``dx`` products, writes
  ``dx = p^T gxp + gs^T qt`` (zero past a text's EOS, written once, no atomics) and adds
  ``gs @ x`` into the program's own ``dqt`` partial.
* long sequences (``_bwd_tiled_*``): the same with the token axis tiled by ``BN`` and ``p``
  and ``gp`` parked in a per-program fp32 scratch ``[P, 2, L, N]`` between the two sweeps; the
  second sweep visits every token tile (past EOS nothing is read and ``dx = 0`` is written).

Both paths form ``s`` and ``gp`` with the one ``_score_sweep`` helper of
``sparo_readout_common``. A barrier at the top of each sample orders the previous sample's
partial stores and scratch reads (done by other threads: the dot's register layout is not
the load's) before this sample reads the partial back or overwrites the scratch.

Determinism: no atomic touches a result (the fused kernel's atomics are its work counters).
Each program (token owner) owns a ``[L, D]`` fp32 partial of ``dqt``
(first sample: store, later samples: load-add-store, in a fixed order), and the batch-wide
reduction is the finish stage's fixed-order sum over the P partials, so the result is
bitwise reproducible for a given (B, P) and launch configuration
(``tests/test_sparo_readout_triton_paths.py`` compares two processes bitwise). No kernel
accumulates into memory it did not write in the same launch; the fused kernel's work
counters are zeroed by the op before each launch (and before each timing run while tuning).
The key bias gets an exactly-zero gradient (it only adds a per-slot constant to the scores).

Saved from the forward: x, qt, lse (fp32 [B, L]), xp (head-major [Hh, B*S, D]) and
o ([B, L, Vd]).
Precision as in the forward: fp16/bf16 operands on tensor cores with fp32 accumulation (p and
gs cast to the compute dtype for the dots, as FlashAttention does), float32 with
``input_precision="ieee"``. Offsets that multiply a token index by a stride are int64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .sparo_readout_common import (LOG2E, _discard_lines, _discard_rows, _discard_span, _dot, _n_valid, _score_sweep,
                                   _wide, _xp_rows)

#: Bits of the fused kernel's ``DISCARD``: which dead scratch goes out of L2 without a write-back
#: (each set by the op only where its rows fall on whole lines: ``sparo_readout_common.whole_lines``).
#: (Literal in the kernels: the interpreter cannot mix an int constexpr with a global one.)
DISCARD_GXP, DISCARD_SCR, DISCARD_PART = 1, 2, 4
from .sparo_readout_fwd import _first_ticket, _next_ticket


@triton.jit
def _add_partial(PART, offs_l, offs_d, D, dq, ldmask, first):
    """The owner's dqt partial += dq (stored outright for its first sample). The read-back may
    run on other threads than the store of the previous sample (the dot's layout differs from
    the load's): the barrier at the top of each sample orders them; in the one-launch backward
    on another SM even (loaded past L1, ``.cg``), after the owner's flag (acquire)."""
    ptrs = PART + offs_l[:, None] * D + offs_d[None, :]
    if first:
        tl.store(ptrs, dq, mask=ldmask, eviction_policy="evict_last")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=ldmask, other=0.0, cache_modifier=".cg") + dq, mask=ldmask,
                 eviction_policy="evict_last")  # (.cg takes no eviction hint: the store keeps the line)


@triton.jit
def _bwd_one_tile(X, GA, GXP, QT, DX, part, first, x_base, dx_base, g_rows, offs_l, lmask, lse, n_valid, b, qk,
                  scale, N, D, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                  HAS_GA: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One sample, the whole [BL, BN] block in registers: score sweep, gs, then dx and dqt."""
    offs_n = tl.arange(0, BN)
    vmask = offs_n < n_valid
    s, gp = _score_sweep(QT, GXP, x_base, g_rows, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                         True, BL, BN, BD, DOT_PREC, UPCAST, "evict_last")  # x re-read by the second sweep
    msk = lmask[:, None] & vmask[None, :]
    p = tl.where(msk, tl.exp2(s * qk - lse[:, None]), 0.0)
    # renormalise: the recomputed row sums to 1 within an ulp again, so that gp - delta
    # cancels as it does with the forward's probabilities (saturated softmaxes)
    p = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]
    if HAS_GA:
        ga = tl.load(GA + b * stride_gab + offs_l[:, None] * stride_gal + offs_n[None, :] * stride_gan,
                     mask=msk, other=0.0)
        gp += ga.to(tl.float32)
    delta = tl.sum(p * gp, axis=1)
    gs = p * (gp - delta[:, None]) * scale  # d/dqt of the scaled scores
    _bwd_dx_dq(X, GXP, QT, DX, part, first, x_base, dx_base, g_rows, offs_l, lmask, offs_n, vmask,
               p.to(X.dtype.element_ty), gs.to(X.dtype.element_ty), N, D, stride_xn, stride_xd, BD, DOT_PREC, UPCAST)


@triton.jit
def _bwd_dx_dq(X, GXP, QT, DX, part, first, x_base, dx_base, g_rows, offs_l, lmask, offs_n, vmask, pc, gsc, N, D,
               stride_xn, stride_xd, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One-tile second sweep over D: ``dx = p^T gxp + gs^T qt`` (zero past EOS: p = gs = 0 there,
    written once, no atomics) and the program's dqt partial += ``gs @ x``. The feature tiles
    are walked backwards, so the sweep starts on the x tiles the score sweep read last (still
    in L2); dx is never read again in this launch (streamed out: evict_first), the dqt partial
    kept (evict_last, read back for the next sample). x, read here for the last time, takes no
    hint: evict_first on a tile of half a line evicts the line before the other half is read."""
    x_rows = offs_n.to(tl.int64)[:, None] * stride_xn
    nd = tl.cdiv(D, BD)
    for i in range(0, nd):
        offs_d = (nd - 1 - i) * BD + tl.arange(0, BD)
        dmask = offs_d < D
        ldmask = lmask[:, None] & dmask[None, :]
        q = tl.load(QT + offs_l[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0)
        g = tl.load(GXP + g_rows[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0, cache_modifier=".cg")
        dx = _dot(tl.trans(pc), g, None, DOT_PREC, UPCAST)
        dx = _dot(tl.trans(gsc), q, dx, DOT_PREC, UPCAST)
        tl.store(dx_base + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
                 mask=(offs_n < N)[:, None] & dmask[None, :], eviction_policy="evict_first")
        xt = tl.load(x_base + x_rows + offs_d[None, :] * stride_xd, mask=vmask[:, None] & dmask[None, :], other=0.0)
        _add_partial(part, offs_l, offs_d, D, _dot(gsc, xt, None, DOT_PREC, UPCAST), ldmask, first)


@triton.jit
def _bwd_tiled_scores(GA, GXP, QT, scr, x_base, g_rows, offs_l, lmask, lse, n_valid, b, qk, N, D, L, stride_xn,
                      stride_xd, stride_gab, stride_gal, stride_gan, HAS_GA: tl.constexpr, BL: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Tiled sweep 1: p and gp (+ ga) of every valid token tile parked in the program's scratch
    [2, L, N]; returns the row sums of p (to renormalise) and the unnormalised delta."""
    delta = tl.zeros([BL], tl.float32)
    psum = tl.zeros([BL], tl.float32)
    for n0 in range(0, n_valid, BN):
        offs_n = n0 + tl.arange(0, BN)
        vmask = offs_n < n_valid
        msk = lmask[:, None] & vmask[None, :]
        s, gp = _score_sweep(QT, GXP, x_base, g_rows, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                             True, BL, BN, BD, DOT_PREC, UPCAST, "")
        p = tl.where(msk, tl.exp2(s * qk - lse[:, None]), 0.0)
        if HAS_GA:
            ga = tl.load(GA + b * stride_gab + offs_l[:, None] * stride_gal + offs_n[None, :] * stride_gan,
                         mask=msk, other=0.0)
            gp += ga.to(tl.float32)
        delta += tl.sum(p * gp, axis=1)
        psum += tl.sum(p, axis=1)
        ptrs = scr + offs_l[:, None] * N + offs_n[None, :]
        tl.store(ptrs, p, mask=msk)
        tl.store(ptrs + (N * L), gp, mask=msk)
    return psum, delta


@triton.jit
def _bwd_tiled_grads(X, GXP, QT, DX, scr, part, first, x_base, dx_base, g_rows, offs_l, lmask, inv, delta, n_valid,
                     scale, N, D, L, stride_xn, stride_xd, BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Tiled sweep 2, feature tile by feature tile: gs from the scratch, dx of every token tile
    (zero past EOS, written once) and the program's dqt partial."""
    for d0 in range(0, D, BD):
        offs_d = d0 + tl.arange(0, BD)
        dmask = offs_d < D
        ldmask = lmask[:, None] & dmask[None, :]
        q = tl.load(QT + offs_l[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0)
        g = tl.load(GXP + g_rows[:, None] * D + offs_d[None, :], mask=ldmask, other=0.0, cache_modifier=".cg")
        dq = tl.zeros([BL, BD], tl.float32)
        for n0 in range(0, N, BN):  # every tile: p = gs = 0 past EOS (no scratch read there) gives dx = 0
            offs_n = n0 + tl.arange(0, BN)
            vmask = offs_n < n_valid
            msk = lmask[:, None] & vmask[None, :]
            ptrs = scr + offs_l[:, None] * N + offs_n[None, :]
            p = tl.load(ptrs, mask=msk, other=0.0) * inv[:, None]
            gsc = (p * (tl.load(ptrs + (N * L), mask=msk, other=0.0) - delta[:, None]) * scale).to(X.dtype.element_ty)
            dx = _dot(tl.trans(p.to(X.dtype.element_ty)), g, None, DOT_PREC, UPCAST)
            dx = _dot(tl.trans(gsc), q, dx, DOT_PREC, UPCAST)
            tl.store(dx_base + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
                     mask=(offs_n < N)[:, None] & dmask[None, :])
            xt = tl.load(x_base + offs_n.to(tl.int64)[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                         mask=vmask[:, None] & dmask[None, :], other=0.0)
            dq = _dot(gsc, xt, dq, DOT_PREC, UPCAST)
        _add_partial(part, offs_l, offs_d, D, dq, ldmask, first)


@triton.jit
def _token_sample(X, EOS, LSE, GA, GXP, QT, DX, part, scr, b, first, scale, B, N, D, L, S,
                  stride_xb, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                  HAS_EOS: tl.constexpr, HAS_GA: tl.constexpr, ONE_TILE: tl.constexpr, BL: tl.constexpr,
                  BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  DISCARD: tl.constexpr):
    """Sample ``b`` (int64) into the dqt partial ``part`` (stored outright when ``first``), with
    the owner's scratch ``scr`` (tiled path). After it the sample's gxp rows (and the scratch)
    are dead: discarded from L2 (``DISCARD`` bits ``DISCARD_GXP``, ``DISCARD_SCR``) instead of
    written back when evicted."""
    offs_l = tl.arange(0, BL)
    lmask = offs_l < L
    qk = scale * 1.4426950408889634
    # the previous sample's dqt-partial stores and scratch reads (other threads) are done
    # before this sample reads the partial back or overwrites the scratch
    tl.debug_barrier()
    x_base = X + b * stride_xb
    dx_base = DX + b * N * D
    g_rows = _xp_rows(offs_l, b, B, S)
    lse = tl.load(LSE + b * L + offs_l, mask=lmask, other=0.0)
    n_valid = _n_valid(EOS, b, N, HAS_EOS)
    if ONE_TILE:
        _bwd_one_tile(X, GA, GXP, QT, DX, part, first, x_base, dx_base, g_rows, offs_l, lmask, lse, n_valid, b,
                      qk, scale, N, D, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                      HAS_GA, BL, BN, BD, DOT_PREC, UPCAST)
    else:
        psum, delta = _bwd_tiled_scores(GA, GXP, QT, scr, x_base, g_rows, offs_l, lmask, lse, n_valid, b, qk,
                                        N, D, L, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                                        HAS_GA, BL, BN, BD, DOT_PREC, UPCAST)
        tl.debug_barrier()  # scratch written by one thread is read back by another
        inv = 1.0 / tl.maximum(psum, 1e-30)  # renormalise the recomputed p (see the one-tile path)
        _bwd_tiled_grads(X, GXP, QT, DX, scr, part, first, x_base, dx_base, g_rows, offs_l, lmask, inv,
                         delta * inv, n_valid, scale, N, D, L, stride_xn, stride_xd, BL, BN, BD, DOT_PREC, UPCAST)
        _discard_span(scr, 2 * L * N, (DISCARD & 2) != 0)
    _discard_rows(GXP, g_rows, lmask, D, (DISCARD & 1) != 0)


@triton.jit
def _bwd_token_kernel(
    X, EOS, LSE, GA, GXP, QT, SCR, DX, DQT,
    scale, B, N, D, L, S, NPROG,
    stride_xb, stride_xn, stride_xd,
    stride_gab, stride_gal, stride_gan,
    HAS_EOS: tl.constexpr, HAS_GA: tl.constexpr, ONE_TILE: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr = False,
):
    """Persistent token-level backward, grid ``(P,)``: program pid takes samples pid, pid + P, ...
    in that order, into its own dqt partial (it discards nothing: its gxp and scratch are the
    tests' to read)."""
    owner = tl.program_id(0)
    part = DQT + owner.to(tl.int64) * L * D
    scr = SCR + owner.to(tl.int64) * 2 * L * N  # per-owner [2, L, N] (tiled path only)
    for i in range(0, tl.cdiv(B - owner, NPROG)):
        _token_sample(X, EOS, LSE, GA, GXP, QT, DX, part, scr, (owner + i * NPROG).to(tl.int64), i == 0, scale,
                      B, N, D, L, S, stride_xb, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                      HAS_EOS, HAS_GA, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST, 0)


@triton.jit
def _wait_count(CTR, target):
    """Spin until the counter ``CTR`` reaches ``target`` (acquire: the writes released before
    each increment are visible to this program; the barrier hands that to all its threads)."""
    done = tl.atomic_add(CTR, 0, sem="acquire")
    while done < target:
        done = tl.atomic_add(CTR, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _bwd_fused_kernel(
    G, O, XP, WV, WO, GXP, DWV, DBV, DWO_P, DBO_P,
    X, EOS, LSE, GA, QT, SCR, DX, DQT,
    QE, WK, DQ, DWK, DWO, DBO, SYNC,
    scale, B, N, D, L, S, NPROG, H, A, V, VD, NV, TILES, STILES,
    stride_xb, stride_xn, stride_xd,
    stride_gab, stride_gal, stride_gan,
    HAS_EOS: tl.constexpr, HAS_GA: tl.constexpr, ONE_TILE: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr,
    SHARED: tl.constexpr, BS: tl.constexpr, BA: tl.constexpr, BDF: tl.constexpr, BH: tl.constexpr,
    BVD: tl.constexpr, BP: tl.constexpr, BSR: tl.constexpr,
    BMS: tl.constexpr, BDS: tl.constexpr, BVDS: tl.constexpr, BVS: tl.constexpr, BMG: tl.constexpr,
    TICKETS: tl.constexpr = True,
    UPCAST: tl.constexpr = False, DISCARD: tl.constexpr = 0, ITEM_CALLS: tl.constexpr = True,
):
    """The whole backward in one persistent launch (grid ``(P,)``): the slot, token and finish
    stages of the three kernels above (gxp, dW_V and the dqt partials read back by the launch
    that wrote them, the shared k/v weight read by one launch). The token stage
    runs in rounds of NPROG samples (round r: samples r * NPROG + o, o < NPROG), and each round's
    gxp rows are formed just before its samples, so that they are read while still in L2 (then
    discarded, ``DISCARD``). One ticket counter (``SYNC[0]``) hands out, in this order: per round
    r, its Hh gxp items (``_gxp_rows``) and its NPROG owner items (item (r, o): sample r * NPROG
    + o into owner o's dqt partial, as ``_bwd_token_kernel``'s program o); then the Hh x STILES
    batch-sum tiles (dW_V, db_V, the dW_O / db_O partials) and the Hh x TILES finish tiles. Waits: an owner
    item for its round's gxp items (``SYNC[3 + r]``) and for the owner's previous item
    (``SYNC[3 + R + o]``, rounds done: the partial is read back in sample order, deterministic);
    a finish tile for every owner item (``SYNC[1]``) and every batch-sum tile (``SYNC[2]``). A
    waiting program holds a later ticket than all it waits for, whose programs are therefore
    running: no deadlock however many programs are resident; under the CPU interpreter (programs
    one after another, the first takes every ticket in order) no wait spins. An item's arithmetic
    does not depend on which program runs it: bitwise the results of the three kernels. Tickets
    come in order, so the stages are separate loops (one loop spilled); the rounds' two kinds of
    item share one loop as calls (x's strides passed in int64). Without ``TICKETS`` (the
    interpreter's default) one program per item, program t running item t, and nothing waits (the
    interpreter runs programs in grid order). ``DISCARD``: the dead scratch dropped from L2."""
    NSLOT = H * STILES
    R = tl.cdiv(B, NPROG)
    RB = H + NPROG  # items of one round
    RED = R * RB  # the first batch-sum tile
    FIN = RED + NSLOT  # the first finish tile
    END = FIN + H * TILES
    t = _first_ticket(SYNC, TICKETS)
    while t < RED:
        r = t // RB
        u = t - r * RB
        if u < H:  # head u's gxp rows of round r
            if ITEM_CALLS:
                _gxp_call(G, WV, WO, GXP, SYNC, u, r, B, S, L, D, VD, V, NPROG, BMG, BDS, BVDS, BVS, DOT_PREC, UPCAST,
                          TICKETS)
            else:
                _gxp_item(G, WV, WO, GXP, SYNC, u, r, B, S, L, D, VD, V, NPROG, BMG, BDS, BVDS, BVS, DOT_PREC, UPCAST,
                          TICKETS)
        else:  # an owner item of round r
            if ITEM_CALLS:
                _owner_call(X, EOS, LSE, GA, GXP, QT, DX, DQT, SCR, SYNC, u - H, r, R, H, scale, B, N, D, L, S,
                            NPROG, tl.cast(stride_xb, tl.int64), tl.cast(stride_xn, tl.int64), tl.cast(stride_xd, tl.int64),
                            stride_gab, stride_gal, stride_gan,
                            HAS_EOS, HAS_GA, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST, DISCARD, TICKETS)
            else:
                _owner_item(X, EOS, LSE, GA, GXP, QT, DX, DQT, SCR, SYNC, u - H, r, R, H, scale, B, N, D, L, S,
                            NPROG, tl.cast(stride_xb, tl.int64), tl.cast(stride_xn, tl.int64), tl.cast(stride_xd, tl.int64),
                            stride_gab, stride_gal, stride_gan,
                            HAS_EOS, HAS_GA, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST, DISCARD, TICKETS)
        t = _next_ticket(SYNC, END, TICKETS)
    while t < FIN:
        u = t - RED
        _slot_tile(G, O, XP, WV, WO, GXP, DWV, DBV, DWO_P, DBO_P, (u // STILES).to(tl.int64), u % STILES,
                   0, B, B, S, L, D, VD, V, BMS, BDS, BVDS, BVS, DOT_PREC, UPCAST, False, True)
        _count_done(SYNC + 2, TICKETS)
        t = _next_ticket(SYNC, END, TICKETS)
    while t < END:
        if TICKETS:
            _wait_count(SYNC + 1, R * NPROG)
            _wait_count(SYNC + 2, NSLOT)
        f = t - FIN
        _finish_tile(DQT, QE, WK, DWV, DWO_P, DBO_P, DQ, DWK, DWO, DBO, (f // TILES).to(tl.int64), f % TILES,
                     f, H * TILES, NPROG, H, S, A, D, V, VD, NV, SHARED, BS, BA, BDF, BH, BVD, BP, BSR,
                     (DISCARD & 4) != 0)
        t = _next_ticket(SYNC, END, TICKETS)



@triton.jit
def _gxp_item(G, WV, WO, GXP, SYNC, h, r, B, S, L, D, VD, V, NPROG, BMG: tl.constexpr, BDS: tl.constexpr,
              BVDS: tl.constexpr, BVS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
              TICKETS: tl.constexpr):
    """Head h's gxp rows of round r (samples r * NPROG ...), counted done on ``SYNC[3 + r]``.
    The kernel calls it and ``_owner_item`` as functions (``_gxp_call``, ``_owner_call``, not
    inlined) where it can (``ITEM_CALLS``): both share the rounds' loop, and inlined, the
    invariants the compiler hoisted out of each stayed live through the other (ptxas: 255
    registers and 60-140 bytes of spills at vit_b16 on sm_90; as calls, 206-222 and none).
    Triton cannot call a function that uses tensor memory (sm_100's tcgen05 products, half
    precision only): there they are inlined."""
    b0 = r * NPROG
    _gxp_rows(G, WV, WO, GXP, h.to(tl.int64), b0, tl.minimum(B, b0 + NPROG), B, S, L, D, VD, V, BMG, BDS, BVDS, BVS,
              DOT_PREC, UPCAST)
    _count_done(SYNC + 3 + r, TICKETS)


@triton.jit
def _head_rows(m0, b1, h, S, L, M, BM: tl.constexpr):
    """Head h's rows m0 ... m0 + BM of samples up to b1: their mask, their rows of the [B*L, .]
    tensors and of the head-major [Hh*B*S, .] ones."""
    offs_m = m0 + tl.arange(0, BM)
    return offs_m < b1 * S, (offs_m // S).to(tl.int64) * L + h * S + offs_m % S, h * M + offs_m


@triton.jit
def _gxp_rows(G, WV, WO, GXP, h, b0, b1, B, S, L, D, VD, V, BM: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr,
              BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Head ``h`` (int64)'s gxp rows of samples [b0, b1) over every feature tile, row block by
    row block: ``go = g W_O`` formed once per block, not once per feature tile (as
    ``_slot_tile`` must, its dW_V accumulating one tile over the whole batch), so g and W_O are
    read once per round; BM (``bwd_fused_meta``'s ``BMG``) covers a round's rows where it can,
    so W_V[h] is read once per round too."""
    M = B * S
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    offs_v = tl.arange(0, BV)
    vmask = offs_v < V
    wo = tl.load(WO + offs_v[:, None] * VD + offs_vd[None, :], mask=vmask[:, None] & vdmask[None, :], other=0.0)
    for m0 in range(b0 * S, b1 * S, BM):
        mmask, row, hrow = _head_rows(m0, b1, h, S, L, M, BM)
        g = tl.load(G + row[:, None] * V + offs_v[None, :], mask=mmask[:, None] & vmask[None, :], other=0.0)
        goc = _dot(g, wo, None, DOT_PREC, UPCAST).to(G.dtype.element_ty)
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            dmask = offs_d < D
            wv = tl.load(WV + (h * VD + offs_vd)[:, None] * D + offs_d[None, :],
                         mask=vdmask[:, None] & dmask[None, :], other=0.0)
            gxp = _dot(goc, wv, None, DOT_PREC, UPCAST)
            tl.store(GXP + hrow[:, None] * D + offs_d[None, :], gxp.to(GXP.dtype.element_ty),
                     mask=mmask[:, None] & dmask[None, :])


@triton.jit
def _owner_item(X, EOS, LSE, GA, GXP, QT, DX, DQT, SCR, SYNC, o, r, R, NG, scale, B, N, D, L, S, NPROG,
                stride_xb, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                HAS_EOS: tl.constexpr, HAS_GA: tl.constexpr, ONE_TILE: tl.constexpr, BL: tl.constexpr,
                BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                DISCARD: tl.constexpr, TICKETS: tl.constexpr):
    """Owner o's item of round r: after the round's gxp items and the owner's previous item,
    sample r * NPROG + o into its partial; counted done per owner and in all."""
    b0 = r * NPROG
    if TICKETS:
        _wait_count(SYNC + 3 + r, NG)
        _wait_count(SYNC + 3 + R + o, r)
    if b0 + o < B:
        _token_sample(X, EOS, LSE, GA, GXP, QT, DX, DQT + o.to(tl.int64) * L * D,
                      SCR + o.to(tl.int64) * 2 * L * N, (b0 + o).to(tl.int64), r == 0, scale, B, N, D, L, S,
                      stride_xb, stride_xn, stride_xd, stride_gab, stride_gal, stride_gan,
                      HAS_EOS, HAS_GA, ONE_TILE, BL, BN, BD, DOT_PREC, UPCAST, DISCARD)
    _count_done(SYNC + 3 + R + o, TICKETS)
    _count_done(SYNC + 1, TICKETS)


_gxp_call = triton.jit(noinline=True)(_gxp_item.fn)
_owner_call = triton.jit(noinline=True)(_owner_item.fn)


@triton.jit
def _count_done(CTR, TICKETS: tl.constexpr):
    """Count an item done on ``CTR`` (release: every thread's stores precede it)."""
    if TICKETS:
        tl.debug_barrier()
        tl.atomic_add(CTR, 1, sem="release")


@triton.jit
def _slot_tile(G, O, XP, WV, WO, GXP, DWV, DBV, DWO_P, DBO_P, h, dt, b0, b1, B, S, L, D, VD, V, BM: tl.constexpr,
               BD: tl.constexpr, BVD: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
               GXP_ROWS: tl.constexpr, REDUCE: tl.constexpr):
    """Head ``h`` (int64), feature tile ``dt`` of ``_bwd_slot_kernel`` over samples [b0, b1):
    ``GXP_ROWS`` stores their gxp rows, ``REDUCE`` (b0 = 0, b1 = B) forms the batch sums
    (dW_V, and on the first tile db_V and the head's dW_O / db_O partials)."""
    M = B * S
    offs_d = dt * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    offs_v = tl.arange(0, BV)
    vmask = offs_v < V
    wo = tl.load(WO + offs_v[:, None] * VD + offs_vd[None, :], mask=vmask[:, None] & vdmask[None, :], other=0.0)
    if GXP_ROWS:
        wv = tl.load(WV + (h * VD + offs_vd)[:, None] * D + offs_d[None, :], mask=vdmask[:, None] & dmask[None, :],
                     other=0.0)
    else:
        wv = tl.zeros([BVD, BD], WV.dtype.element_ty)  # not read: the batch sums need no W_V
    dwv = tl.zeros([BVD, BD], tl.float32)
    for m0 in range(b0 * S, b1 * S, BM):
        mmask, row, hrow = _head_rows(m0, b1, h, S, L, M, BM)
        g = tl.load(G + row[:, None] * V + offs_v[None, :], mask=mmask[:, None] & vmask[None, :], other=0.0)
        goc = _dot(g, wo, None, DOT_PREC, UPCAST).to(G.dtype.element_ty)
        if GXP_ROWS:
            gxp = _dot(goc, wv, None, DOT_PREC, UPCAST)
            tl.store(GXP + hrow[:, None] * D + offs_d[None, :], gxp.to(GXP.dtype.element_ty),
                     mask=mmask[:, None] & dmask[None, :])
        if REDUCE:
            xp = tl.load(XP + hrow[:, None] * D + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
            dwv = _dot(tl.trans(goc), xp, dwv, DOT_PREC, UPCAST)
    if REDUCE:
        tl.store(DWV + (h * VD + offs_vd)[:, None] * D + offs_d[None, :], dwv.to(DWV.dtype.element_ty),
                 mask=vdmask[:, None] & dmask[None, :])
        if dt == 0:  # a separate sweep (not a branch inside the pipelined loop above: triton 3.6 lost it)
            _slot_head_sums(G, O, WO, DBV, DWO_P, DBO_P, wo, h, B, S, L, VD, V, BM, BVD, BV, DOT_PREC, UPCAST)


@triton.jit
def _slot_head_sums(G, O, WO, DBV, DWO_P, DBO_P, wo, h, B, S, L, VD, V, BM: tl.constexpr, BVD: tl.constexpr,
                    BV: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Head h's ``db_V`` and its partials of ``dW_O = g^T o`` and ``db_O`` over the batch."""
    M = B * S
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    offs_v = tl.arange(0, BV)
    vmask = offs_v < V
    dbv = tl.zeros([BVD], tl.float32)
    dwo = tl.zeros([BV, BVD], tl.float32)
    dbo = tl.zeros([BV], tl.float32)
    for m0 in range(0, M, BM):
        offs_m = m0 + tl.arange(0, BM)
        mmask = offs_m < M
        row = (offs_m // S).to(tl.int64) * L + h * S + offs_m % S
        g = tl.load(G + row[:, None] * V + offs_v[None, :], mask=mmask[:, None] & vmask[None, :], other=0.0)
        dbv += tl.sum(_dot(g, wo, None, DOT_PREC, UPCAST), axis=0)
        o = tl.load(O + row[:, None] * VD + offs_vd[None, :], mask=mmask[:, None] & vdmask[None, :], other=0.0)
        dwo = _dot(tl.trans(g), o, dwo, DOT_PREC, UPCAST)
        dbo += tl.sum(g.to(tl.float32), axis=0)
    tl.store(DBV + h * VD + offs_vd, dbv.to(DBV.dtype.element_ty), mask=vdmask)
    tl.store(DWO_P + h * V * VD + offs_v[:, None] * VD + offs_vd[None, :], dwo, mask=vmask[:, None] & vdmask[None, :])
    tl.store(DBO_P + h * V + offs_v, dbo, mask=vmask)


@triton.jit
def _bwd_slot_kernel(
    G, O, XP, WV, WO, GXP, DWV, DBV, DWO_P, DBO_P,
    B, S, L, D, VD, V,
    BM: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr = False,
):
    """Slot-level backward, grid ``(Hh, cdiv(D, BD))``: for head h and a feature tile, over the
    head's B*S rows (contiguous in the head-major layout): ``go = g W_O`` (recomputed per feature
    tile: [BM, V] x [V, Vd], cheap), ``gxp = go W_V[h]`` (stored head-major, as the token kernel
    reads it), ``dW_V[h] = go^T xp``; the first feature tile also ``db_V[h]`` and the head's
    partials of ``dW_O = g^T o`` and ``db_O`` (summed over heads by the finish kernel)."""
    _slot_tile(G, O, XP, WV, WO, GXP, DWV, DBV, DWO_P, DBO_P, tl.program_id(0).to(tl.int64), tl.program_id(1),
               0, B, B, S, L, D, VD, V, BM, BD, BVD, BV, DOT_PREC, UPCAST, True, True)


@triton.jit
def _sum_partials(PART, h, t, offs_d, dmask, NP, L, S, D, BS: tl.constexpr, BSR: tl.constexpr, BD: tl.constexpr,
                  BP: tl.constexpr, DISCARD: tl.constexpr):
    """Head h's rows of the NP partials over one feature tile, summed BP partials per vector load
    ([BP, BSR, BD] blocks, BSR = next_pow2(S) >= 1, a fixed order: deterministic), returned as
    the [BS, BD] tile the dots take (BS >= 16 rows: at S = 1, 15 of them are zero padding that
    the loads no longer carry)."""
    offs_r = tl.arange(0, BSR)
    offs_p = tl.arange(0, BP)
    rows = (h * S + offs_r)[:, None] * D + offs_d[None, :]  # [BSR, BD] offsets within one partial
    rd = (offs_r < S)[:, None] & dmask[None, :]
    acc = tl.zeros([BSR, BD], tl.float32)
    for p0 in range(0, NP, BP):
        pp = p0 + offs_p
        blk = tl.load(PART + pp.to(tl.int64)[:, None, None] * L * D + rows[None, :, :],
                      mask=(pp < NP)[:, None, None] & rd[None, :, :], other=0.0, cache_modifier=".cg")
        acc += tl.sum(blk, axis=0)
    if DISCARD:  # the partials' lines of this tile are read by no one else: dropped, not written back
        _discard_partials(PART, h, t, NP, L, S, D, BSR, BD, BP)
    if BSR == BS:
        return acc
    else:  # place the BSR rows into a BS-row tile (a select per row, no memory)
        offs_s = tl.arange(0, BS)
        pick = offs_s[:, None, None] == offs_r[None, :, None]
        return tl.sum(tl.where(pick, acc[None, :, :], 0.0), axis=1)


@triton.jit
def _discard_partials(PART, h, t, NP, L, S, D, BSR: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr):
    """Discard the lines of head h's rows over feature tile t in all NP fp32 partials (whole
    lines: D and BD multiples of 32, see ``whole_lines``), after a barrier ending the reads."""
    if BD % 32 == 0:
        tl.debug_barrier()
        offs_p = tl.arange(0, BP)
        offs_r = tl.arange(0, BSR)
        cols = t * BD + tl.arange(0, BD // 32) * 32
        lines = (h * S + offs_r)[:, None] * D + cols[None, :]
        lmask = (offs_r < S)[:, None] & (cols < D)[None, :]
        for p0 in range(0, NP, BP):
            pp = p0 + offs_p
            _discard_lines(PART + pp.to(tl.int64)[:, None, None] * L * D + lines[None, :, :],
                           (pp < NP)[:, None, None] & lmask[None, :, :], True)


@triton.jit
def _finish_tile(PART, QE, WK, DWV, DWO_P, DBO_P, DQ, DWK, DWO, DBO, h, t, item, items, NP, H, S, A, D, V, VD, NV,
                 SHARED: tl.constexpr, BS: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                 BVD: tl.constexpr, BP: tl.constexpr, BSR: tl.constexpr, DISCARD: tl.constexpr):
    """Head ``h`` (int64), feature tile ``t``: the weight gradients of ``_bwd_finish_kernel``;
    ``item`` of ``items`` picks its rows of the dW_O / db_O head sums. Everything the earlier
    stages wrote is loaded past L1 (``.cg``): in the one-launch backward other programs wrote it
    after the launch began. ``DWV`` may be ``DWK`` itself (the one-launch op, shared weight): each
    element is loaded before this program stores it, and no other program touches it."""
    offs_s = tl.arange(0, BS)
    smask = offs_s < S
    offs_a = tl.arange(0, BA)
    amask = offs_a < A
    offs_d = t * BD + tl.arange(0, BD)
    dmask = offs_d < D
    L = H * S
    dqt = _sum_partials(PART, h, t, offs_d, dmask, NP, L, S, D, BS, BSR, BD, BP, DISCARD)
    ad = amask[:, None] & dmask[None, :]
    q = tl.load(QE + (h * S + offs_s)[:, None] * A + offs_a[None, :], mask=smask[:, None] & amask[None, :],
                other=0.0).to(tl.float32)
    wk = tl.load(WK + (h * A + offs_a)[:, None] * D + offs_d[None, :], mask=ad, other=0.0).to(tl.float32)
    dwk = tl.dot(tl.trans(q), dqt, None, input_precision="ieee")
    if SHARED:
        dwk += tl.load(DWV + (h * A + offs_a)[:, None] * D + offs_d[None, :], mask=ad, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    tl.store(DWK + (h * A + offs_a)[:, None] * D + offs_d[None, :], dwk.to(DWK.dtype.element_ty), mask=ad)
    dq = tl.dot(dqt, tl.trans(wk), None, input_precision="ieee")
    tl.store(DQ + t * L * A + (h * S + offs_s)[:, None] * A + offs_a[None, :], dq,
             mask=smask[:, None] & amask[None, :])
    _sum_head_partials(DWO_P, DBO_P, DWO, DBO, item, items, H, V, VD, NV, BH, BVD)


@triton.jit
def _bwd_finish_kernel(
    PART, QE, WK, DWV, DWO_P, DBO_P, DQ, DWK, DWO, DBO,
    NP, H, S, A, D, V, VD, NV,
    SHARED: tl.constexpr, BS: tl.constexpr, BA: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    BVD: tl.constexpr, BP: tl.constexpr, BSR: tl.constexpr,
):
    """Weight gradients, grid ``(Hh, cdiv(D, BD))``: program (h, t) sums the NP per-program
    ``dqt`` partials of head h's S slots over feature tile t (``_sum_partials``), then through
    the absorbed query ``qt = W_K[h]^T q``: the ``dW_K[h]`` tile ``q^T dqt`` (+ ``dW_V[h]`` when
    k and v share the weight) and the tile's fp32 partial of ``dq = dqt W_K[h]^T`` at ``DQ[t]``
    (summed over the cdiv(D, BD) tiles by the op: one small PyTorch sum). Each program also sums
    NV rows of the per-head ``dW_O`` / ``db_O`` partials (rows ``pid, pid + P, ...``, P = the
    grid size). Weight-sized work only: products in true fp32 (``ieee``)."""
    h = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    _finish_tile(PART, QE, WK, DWV, DWO_P, DBO_P, DQ, DWK, DWO, DBO, h, t, h * tl.num_programs(1) + t,
                 H * tl.num_programs(1), NP, H, S, A, D, V, VD, NV, SHARED, BS, BA, BD, BH, BVD, BP, BSR, False)


@triton.jit
def _sum_head_partials(DWO_P, DBO_P, DWO, DBO, pid, P, H, V, VD, NV, BH: tl.constexpr, BVD: tl.constexpr):
    """Rows v = pid, pid + P, ... of ``dW_O = sum_h dW_O_h`` and ``db_O`` (the same NV trips in
    every program; rows past V masked by tensors, not a scalar branch)."""
    offs_h = tl.arange(0, BH)
    hmask = offs_h < H
    offs_vd = tl.arange(0, BVD)
    for i in range(0, NV):
        v = pid + i * P
        hok = hmask & (offs_h * 0 + v < V)
        dok = (offs_vd < VD) & (offs_vd * 0 + v < V)
        w = tl.load(DWO_P + offs_h[:, None] * V * VD + v * VD + offs_vd[None, :],
                    mask=hok[:, None] & dok[None, :], other=0.0, cache_modifier=".cg")
        tl.store(DWO + v * VD + offs_vd, tl.sum(w, axis=0).to(DWO.dtype.element_ty), mask=dok)
        bo = tl.load(DBO_P + offs_h * V + v, mask=hok, other=0.0, cache_modifier=".cg")
        tl.store(DBO + v + offs_h * 0, tl.zeros([BH], tl.float32) + tl.sum(bo, axis=0), mask=hok & (offs_h == 0))


#: Tests set this to force a number of persistent programs (the CPU default is min(B, 2)).
PROGRAMS_OVERRIDE: Optional[int] = None


def programs_forced() -> bool:
    return PROGRAMS_OVERRIDE is not None


def owner_bytes(L: int, N: int, D: int, itemsize: int, tiled: bool) -> int:
    """Bytes one token owner keeps in L2 while it works on a sample: the sample's x (re-read by
    the second sweep) and gxp rows, its fp32 dqt partial, and the tiled path's fp32 scratch."""
    return (N * D + L * D) * itemsize + L * D * 4 + (2 * L * N * 4 if tiled else 0)


def num_programs(B: int, device: torch.device) -> int:
    """Persistent programs of the backward: about one per SM on a GPU (fewer when B is small)."""
    if PROGRAMS_OVERRIDE is not None:
        return max(1, min(B, PROGRAMS_OVERRIDE))
    if device.type != "cuda":
        return min(B, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(B, sms))


# ----------------------------------------------------------------------------- refs
def bwd_slot_ref(g: Tensor, o: Tensor, xp_h: Tensor, v_weight: Tensor, proj_weight: Tensor
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """PyTorch reference of ``_bwd_slot_kernel`` in fp32: (gxp head-major [Hh, B*S, D], dW_V,
    db_V, per-head dW_O partials [Hh, V, Vd], per-head db_O partials [Hh, V])."""
    H, M, D = xp_h.shape
    B, L, V = g.shape
    S, vd = M // B, v_weight.shape[0] // H
    g_h = _wide(g).view(B, H, S, V).permute(1, 0, 2, 3).reshape(H, M, V)  # head-major rows
    o_h = _wide(o).view(B, H, S, vd).permute(1, 0, 2, 3).reshape(H, M, vd)
    go = g_h @ _wide(proj_weight)  # [Hh, B*S, Vd]
    wv = _wide(v_weight).view(H, vd, D)
    gxp = torch.bmm(go, wv)
    dwv = torch.bmm(go.transpose(1, 2), _wide(xp_h)).reshape(H * vd, D)
    return gxp, dwv, go.sum(1).reshape(-1), torch.bmm(g_h.transpose(1, 2), o_h), g_h.sum(1)


def bwd_token_ref(x: Tensor, p: Tensor, ga: Optional[Tensor], gxp: Tensor, qt: Tensor,
                  scale: float) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``_bwd_token_kernel`` (after the partial sum), with gxp in [B, L, D]
    and the unscaled qt: (dx, dqt fp32), dqt the gradient of the unscaled qt."""
    xf, gxf = _wide(x), _wide(gxp)
    gp = torch.einsum("bld,bnd->bln", gxf, xf)
    if ga is not None:
        gp = gp + _wide(ga)
    gs = p * (gp - (p * gp).sum(-1, keepdim=True))
    dx = torch.einsum("bln,bld->bnd", p, gxf) + torch.einsum("bln,ld->bnd", gs, _wide(qt)) * scale
    dqt = torch.einsum("bln,bnd->ld", gs, xf) * scale
    return dx.to(x.dtype), dqt


def bwd_finish_ref(part: Tensor, q_emb: Tensor, k_weight: Tensor, dwv: Optional[Tensor], dwo_p: Tensor,
                   dbo_p: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch reference of ``_bwd_finish_kernel`` (and the op's sum of its dq partials) in fp32:
    (dq_emb, dW_K (+ dW_V when ``dwv`` is given: shared k/v), dW_O, db_O)."""
    _, H, S, _, A = q_emb.shape
    D = part.shape[-1]
    dqt = _wide(part).sum(0).view(H, S, D)
    q = _wide(q_emb).view(H, S, A)
    wk = _wide(k_weight).view(H, A, D)
    dq = torch.bmm(dqt, wk.transpose(1, 2)).view(q_emb.shape)
    dwk = torch.bmm(q.transpose(1, 2), dqt).reshape(H * A, D)
    if dwv is not None:
        dwk = dwk + _wide(dwv)
    return dq, dwk, _wide(dwo_p).sum(0), _wide(dbo_p).sum(0)


__all__ = ["_bwd_slot_kernel", "_bwd_token_kernel", "_bwd_finish_kernel", "_bwd_fused_kernel", "num_programs", "bwd_slot_ref",
           "bwd_token_ref", "bwd_finish_ref", "LOG2E"]
