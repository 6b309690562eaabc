"""Inference Triton kernel of the SPARO read-out: pool and project in one launch, nothing saved.

Design (one kernel launch and one small memset; docs/DESIGN.md, "The inference path")
--------------------------------------------------------------------------------------
Without gradients the forward needs neither the log-sum-exp nor the pooled values ``o``, and the
pooled tokens ``xp`` (``[B, L, D]``, a third of x at vit_b16 and more than x when N < L) only
carry data from the pooling to the value projection. The training forward writes all of ``xp``
to memory in one launch and reads it back in the next (two DRAM passes over 25 MB at vit_b16,
fp16: 0.6x the forward floor). Here ``xp`` lives in a small **ring** of ``RING = LOOK + 1``
chunks of ``G`` samples each, rewritten as the batch streams through, so the bytes that reach
DRAM are x, the weights, y (and ``attn`` when asked) plus at most one ring; a projection drops
its ring rows from L2 once read (``discard.global.L2``, sm_80+), so that a ring line reaches
DRAM only if it was evicted before its projection.

``_infer_kernel``, a persistent grid of ``P`` programs, works through one ordered list of items,
each program taking the next item from an atomic ticket counter:

* a **pool item** (sample ``b`` of chunk ``c``): the one-tile pooling of the training forward
  (the whole ``[BL, BN]`` score block in registers, ``_score_sweep`` of
  ``sparo_readout_common``, exp2 softmax, ``attn`` written when asked), writing the sample's
  ``L`` pooled rows into ring chunk ``c % RING``, head-major inside the chunk (row
  ``h*G*S + g*S + s`` for slot ``l = h*S + s`` of the chunk's ``g``-th sample), then counting
  itself into ``ready[c]``;
* a **projection item** (chunk ``c``, head ``h``): the grouped value GEMM of the head over the
  chunk's ``G*S`` ring rows (``W_V[h]`` read once per chunk) fused with the shared output
  projection, written straight into ``out``; then counting itself into ``done[c]``.

Order: the pools of chunks ``0 .. LOOK-1``, then for every chunk ``c`` its ``Hh`` projections
followed by the pools of chunk ``c + LOOK`` (which reuse the ring chunk of ``c - 1``). A
projection waits until its chunk's pools are all in ``ready``; a pool waits until the previous
user of its ring chunk is ``done``. Every wait is on items *earlier* in the list, and tickets are
taken in list order by running programs, so the earliest unfinished item never waits on anything
unfinished: no deadlock, however many programs are resident (no co-residency assumption).
Synchronisation: a CTA barrier, then a ``release`` atomic add on the counter (producer); an
``acquire`` atomic read in a spin loop, then a CTA barrier (consumer); ring rows are read with
``.cg`` loads (L2, never a stale L1 line of the ring chunk's previous use). The counters and the
ticket (``SYNC``, int32) are zeroed by the launcher, the second launch.

Under the Triton CPU interpreter programs run one after another: program 0 takes every ticket in
list order, so every wait is already met when reached; the kernel records a wait that is not
(an ordering bug) in ``SYNC[1]`` instead of spinning forever, and the launcher raises.

Why not one program per sample projecting its own pooled rows: each sample needs every head's
``W_V[h]`` ([L*Vd, D], 6.3 MB at vit_b16), 21x its 0.3 MB of tokens, requested from L2 per sample
(1.6 GB per vit_b16 batch). The chunked projection requests ``W_V`` once per chunk of ``G``
samples. Why a ring and not all of ``xp`` in L2: the ring bounds what is written to memory by the
ring's size, not the batch's (the ring's lines are rewritten in L2 while resident, or dropped).

Limits: the one-tile pooling only (``N`` up to 256 tokens in fp16/bf16, 64 in fp32, at L = 64:
``sparo_readout_autotune.pool_meta``); longer sequences use the training forward's kernels
(``supported`` says which). Block sizes: the pool space's first config for the pooling, and
``G``, ``LOOK`` from ``infer_meta`` (fixed, not autotuned: the ring state would have to be
reset between trials).

``readout_infer(x, eos_indices, qt, v_weight, v_bias, proj_weight, proj_bias, need_weights) ->
(out, attn)`` is a ``torch.library.triton_op`` with an explicit schema and a fake
implementation; it takes the *unscaled* absorbed query ``qt = W_K[h]^T q_l`` (``[L, D]``, which
the caller caches per weight version) and has no autograd formula: it is the no-grad path.
``readout_infer_ref`` is its PyTorch reference.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import sparo_readout_autotune as at
from .sparo_readout_common import (_discard_rows, _dot, _n_valid, _score_sweep, _wide, discard_supported, next_pow2,
                                   whole_lines)

try:
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # pragma: no cover
    _JITFunction = ()


@triton.jit
def _wait(FLAG, need, ERR, INTERPRETED: tl.constexpr):
    """Block until ``*FLAG >= need`` (acquire); the interpreter records an unmet wait in ERR."""
    cnt = tl.atomic_add(FLAG, 0, sem="acquire")
    if INTERPRETED:
        tl.atomic_add(ERR, (cnt < need).to(tl.int32))
    else:
        while cnt < need:
            cnt = tl.atomic_add(FLAG, 0, sem="acquire")
    tl.debug_barrier()  # the whole program reads after the wait


@triton.jit
def _signal(FLAG):
    tl.debug_barrier()  # every thread's stores (or loads) of the item are done
    tl.atomic_add(FLAG, 1, sem="release")


@triton.jit
def _pool_item(X, EOS, QT, ATTN, RING, b, ring_row0, g, N, D, L, S, qk, stride_xb, stride_xn, stride_xd,
               HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr, G: tl.constexpr, BL: tl.constexpr,
               BN: tl.constexpr, BD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Sample b: scores, softmax (attn when asked), pooled rows into its ring chunk."""
    offs_l = tl.arange(0, BL)
    lmask = offs_l < L
    offs_n = tl.arange(0, BN)
    n_valid = _n_valid(EOS, b, N, HAS_EOS)
    vmask = offs_n < n_valid
    x_base = X + b * stride_xb
    raw, _ = _score_sweep(QT, QT, x_base, offs_l, offs_l, lmask, offs_n, vmask, D, stride_xn, stride_xd,
                          False, BL, BN, BD, DOT_PREC, UPCAST, "")
    raw = tl.where(vmask[None, :], raw * qk, float("-inf"))
    e = tl.exp2(raw - tl.max(raw, axis=1)[:, None])  # no valid token: NaN, as torch.softmax
    prob = e / tl.sum(e, axis=1)[:, None]
    if NEED_WEIGHTS:
        amask = lmask[:, None] & (offs_n < N)[None, :]
        tl.store(ATTN + b * L * N + offs_l[:, None] * N + offs_n[None, :], prob.to(ATTN.dtype.element_ty), mask=amask)
    prob = prob.to(X.dtype.element_ty)  # the pooling product's operand, as in the training forward
    ring_rows = (ring_row0 + (offs_l // S) * (G * S) + g * S + offs_l % S).to(tl.int64)
    tok = offs_n.to(tl.int64)[:, None] * stride_xn
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        x_tile = tl.load(x_base + tok + cols[None, :] * stride_xd, mask=vmask[:, None] & cmask[None, :], other=0.0)
        pooled = _dot(prob, x_tile, None, DOT_PREC, UPCAST)
        tl.store(RING + ring_rows[:, None] * D + cols[None, :], pooled.to(RING.dtype.element_ty),
                 mask=lmask[:, None] & cmask[None, :])


@triton.jit
def _proj_item(RING, WV, BV, WO, BO, OUT, c, h, ring_row0, B, S, L, D, VD, V,
               G: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr, BVO: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, DISCARD: tl.constexpr):
    """Head h of chunk c: ``o = xp W_V[h]^T + b_V[h]``, ``out = o W_O^T + b_O`` over the chunk's rows.
    Its ring rows are then dead until a later pool rewrites them: with ``DISCARD`` they leave L2
    unwritten (before the item signals, so before any pool may write them again)."""
    r = tl.arange(0, ROWS)
    sample = c * G + r // S
    rmask = (r < G * S) & (sample < B)
    src = (ring_row0 + h * (G * S) + r).to(tl.int64)
    offs_vd = tl.arange(0, BVD)
    vdmask = offs_vd < VD
    acc = tl.zeros([ROWS, BVD], tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        cmask = cols < D
        xp = tl.load(RING + src[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0,
                     cache_modifier=".cg")
        wv_t = tl.load(WV + (h * VD + offs_vd)[None, :] * D + cols[:, None], mask=vdmask[None, :] & cmask[:, None],
                       other=0.0)
        acc = _dot(xp, wv_t, acc, DOT_PREC, UPCAST)
    o = (acc + tl.load(BV + h * VD + offs_vd, mask=vdmask, other=0.0).to(tl.float32)[None, :])
    o = o.to(OUT.dtype.element_ty)  # the training forward rounds o to the compute dtype too
    dst = sample.to(tl.int64) * L + h * S + r % S
    for v0 in range(0, V, BVO):
        offs_v = v0 + tl.arange(0, BVO)
        vmask = offs_v < V
        wo_t = tl.load(WO + offs_v[None, :] * VD + offs_vd[:, None], mask=vmask[None, :] & vdmask[:, None], other=0.0)
        y = _dot(o, wo_t, None, DOT_PREC, UPCAST) + tl.load(BO + offs_v, mask=vmask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + dst[:, None] * V + offs_v[None, :], y.to(OUT.dtype.element_ty),
                 mask=rmask[:, None] & vmask[None, :])
    _discard_rows(RING, src, rmask, D, DISCARD)


@triton.jit
def _item(t, G, H, LOOK):
    """Ticket t -> (is_proj, chunk, head or sample in the chunk). The list: the G pools of each of
    chunks 0 .. LOOK-1, then per chunk c its H projections and the G pools of chunk c + LOOK
    (items of chunks past the batch are no-ops); LOOK * G + C * (H + G) items in all."""
    head = LOOK * G
    u = tl.maximum(t - head, 0)
    is_proj = (t >= head) & (u % (H + G) < H)
    c = tl.where(t < head, t // G, tl.where(is_proj, u // (H + G), u // (H + G) + LOOK))
    k = tl.where(t < head, t % G, tl.where(is_proj, u % (H + G), u % (H + G) - H))
    return is_proj, c, k


@triton.jit
def _deps(is_proj, c, B, C, G, H, LOOK):
    """Synchronisation of an item, as indices into the counters ``ready[C] | done[C]``: (the counter
    it waits on, -1 for none; the count it needs; the counter it adds one to; its ring chunk). A
    projection waits for its chunk's pools; a pool of chunk c > LOOK waits for the projections of
    chunk c - LOOK - 1, the previous user of its ring chunk."""
    wait = tl.where(is_proj, c, tl.where(c > LOOK, C + c - LOOK - 1, -1))
    need = tl.where(is_proj, tl.minimum(G, B - c * G), H)
    sig = tl.where(is_proj, C + c, c)
    return wait, need, sig, c % (LOOK + 1)


@triton.jit
def _infer_kernel(
    X, EOS, QT, WV, BV, WO, BO, ATTN, OUT, RING, SYNC,
    scale, B, N, D, L, S, H, VD, V, C,
    stride_xb, stride_xn, stride_xd,
    HAS_EOS: tl.constexpr, NEED_WEIGHTS: tl.constexpr, G: tl.constexpr, LOOK: tl.constexpr, ROWS: tl.constexpr,
    BL: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BVD: tl.constexpr, BVO: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, INTERPRETED: tl.constexpr, DISCARD: tl.constexpr = False,
):
    """Persistent: take tickets until the item list (see the module docstring) is exhausted."""
    qk = scale * 1.4426950408889634  # scores in the log2 domain
    FLAGS = SYNC + 2  # ready[C], then done[C]
    chunk_rows = H * G * S  # ring rows of one chunk
    t = tl.atomic_add(SYNC, 1)
    while t < LOOK * G + C * (H + G):
        is_proj, c, k = _item(t, G, H, LOOK)
        wait, need, sig, ring = _deps(is_proj, c, B, C, G, H, LOOK)
        if is_proj:
            _wait(FLAGS + wait, need, SYNC + 1, INTERPRETED)
            _proj_item(RING, WV, BV, WO, BO, OUT, c, k, ring * chunk_rows, B, S, L, D, VD, V,
                       G, ROWS, BD, BVD, BVO, DOT_PREC, UPCAST, DISCARD)
            _signal(FLAGS + sig)
        elif (c < C) & (c * G + k < B):
            if wait >= 0:
                _wait(FLAGS + wait, need, SYNC + 1, INTERPRETED)
            b = (c * G + k).to(tl.int64)
            _pool_item(X, EOS, QT, ATTN, RING, b, ring * chunk_rows, k, N, D, L, S, qk, stride_xb, stride_xn,
                       stride_xd, HAS_EOS, NEED_WEIGHTS, G, BL, BN, BD, DOT_PREC, UPCAST)
            _signal(FLAGS + sig)
        t = tl.atomic_add(SYNC, 1)


#: Words of ``SYNC``: the ticket counter, and the error word the interpreter's ``_wait`` adds to
#: right after each wait's flag read (the L2 count splits the kernel into items at the tickets and
#: orders them by these waits: ``access_stream.Tickets``).
SYNC_TICKET, SYNC_ERROR = 0, 1
#: True when the kernel was defined under the Triton CPU interpreter.
INTERPRETED = not isinstance(_infer_kernel, _JITFunction)
#: Tests set these to exercise several chunks and ring reuse on tiny batches: {"G": .., "LOOK": ..}.
META_OVERRIDE: Dict[str, int] = {}


def _upcast(x: Tensor) -> bool:
    """fp32 products for bfloat16 under the interpreter only (its bf16 ``tl.dot`` is broken)."""
    return INTERPRETED and x.dtype == torch.bfloat16


def supported(L: int, N: int, D: int, dtype: torch.dtype) -> bool:
    """True when the fused kernel takes the shape (the one-tile pooling fits)."""
    return bool(at.pool_meta(L, N, D, dtype)["ONE_TILE"])


def infer_meta(L: int, N: int, D: int, S: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    """Block sizes and ring geometry. ``G * S`` rows per projection (32: one mma.sync-sized tile,
    and ``W_V`` read once per 32 samples); ``LOOK = 2``: three ring chunks, 96 samples' pooled rows
    (9.4 MB at vit_b16, fp16) in flight, enough pools for about half of an H100's SMs at a time."""
    pool = at.pool_meta(L, N, D, dtype)
    space = at.pool_space(L, N, D, dtype)
    # the projection branch and the item loop live beside the pooling: a 64-wide feature tile
    # spilled at vit_b16 on sm_90 (255 registers), 32 does not (238); in fp32 (FMA products) a
    # 32-wide tile in 2 stages spilled 16-36 bytes on sm_80/90/100/120 (vit_b32, the small test
    # shapes), a 16-wide one in 1 stage nothing on any (Triton 3.8)
    if dtype == torch.float32:
        fits = (lambda c: c["BD"] <= 16 and c["num_stages"] == 1)
    else:
        fits = (lambda c: c["BD"] <= 32)
    cfg, warps, stages = at.split(next((c for c in space if fits(c)), space[0]))
    meta = dict(G=max(1, 32 // S), LOOK=2, BL=pool["BL"], BN=pool["BN"], BD=cfg["BD"], BVD=next_pow2(VD),
                BVO=next_pow2(V, hi=64 if dtype != torch.float32 else 32), num_warps=warps, num_stages=stages)
    meta.update(META_OVERRIDE)
    meta["LOOK"] = max(1, meta["LOOK"])  # a chunk's pools must come before its projections
    meta["ROWS"] = next_pow2(meta["G"] * S)
    return meta


def num_programs(work: int, device: torch.device) -> int:
    """One program per SM (any count is deadlock-free; more than the SMs only adds spinning)."""
    if INTERPRETED or device.type != "cuda":
        return 2  # the interpreter: program 0 does everything, program 1 checks that a late program exits
    return min(work, torch.cuda.get_device_properties(device).multi_processor_count)


def ring_shape(B: int, L: int, D: int, G: int, LOOK: int) -> Tuple[int, int]:
    """Rows of the ring: (LOOK + 1) chunks of G samples' L rows, or fewer for a small batch."""
    chunks = min(LOOK + 1, triton.cdiv(B, G))
    return chunks * G * L, D


_SCHEMA = ("(Tensor x, Tensor? eos_indices, Tensor qt, Tensor v_weight, Tensor v_bias, Tensor proj_weight, "
           "Tensor proj_bias, int num_heads, float scale, bool need_weights) -> (Tensor, Tensor)")


def launch_infer(x: Tensor, eos: Optional[Tensor], qt: Tensor, v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor,
                 proj_bias: Tensor, num_heads: int, scale: float, need_weights: bool) -> Tuple[Tensor, Tensor]:
    """The memset of the counters, then ``_infer_kernel`` (ref: ``readout_infer_ref``): (out, attn or empty)."""
    B, N, D = x.shape
    L, H = qt.shape[0], num_heads
    S, vd, V = L // H, v_weight.shape[0] // H, proj_weight.shape[0]
    meta = infer_meta(L, N, D, S, vd, V, x.dtype)
    warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
    C = triton.cdiv(B, meta["G"])
    ring = x.new_empty(ring_shape(B, L, D, meta["G"], meta["LOOK"]))
    sync = torch.zeros((2 + 2 * C,), device=x.device, dtype=torch.int32)  # ticket, error, ready[C], done[C]
    out = x.new_empty((B, L, V))
    attn = x.new_empty((B, L, N) if need_weights else (0,))
    kernel = _infer_kernel if INTERPRETED else wrap_triton(_infer_kernel)
    kernel[(num_programs(B + C * H, x.device),)](
        x, eos.contiguous() if eos is not None else sync, qt.contiguous(), v_weight.contiguous(), v_bias.contiguous(),
        proj_weight.contiguous(), proj_bias.contiguous(), attn if need_weights else out, out, ring, sync,
        scale, B, N, D, L, S, H, vd, V, C, x.stride(0), x.stride(1), x.stride(2),
        HAS_EOS=eos is not None, NEED_WEIGHTS=need_weights, DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        UPCAST=_upcast(x), INTERPRETED=INTERPRETED,
        DISCARD=discard_supported(x.device) and whole_lines(ring, D * x.element_size()), **meta,
        num_warps=warps, num_stages=stages)
    if INTERPRETED and int(sync[1]) != 0:
        raise RuntimeError("_infer_kernel: an item waited on one not yet done (the item order is broken)")
    return out, attn


readout_infer = triton_op("sparo_fast::readout_infer", mutates_args=(), schema=_SCHEMA)(launch_infer)


@readout_infer.register_fake
def _readout_infer_fake(x, eos_indices, qt, v_weight, v_bias, proj_weight, proj_bias, num_heads, scale, need_weights):
    B, N, _ = x.shape
    L = qt.shape[0]
    return x.new_empty((B, L, proj_weight.shape[0])), x.new_empty((B, L, N) if need_weights else (0,))


if INTERPRETED:
    # interpreted kernels cannot be traced into a graph: keep the op opaque under torch.compile
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    @readout_infer.register_torch_dispatch(FunctionalTensorMode)
    def _keep_opaque(mode, op, types, args, kwargs):
        return mode.__torch_dispatch__(op, types, args, kwargs)


def readout_infer_ref(x: Tensor, eos_indices: Optional[Tensor], qt: Tensor, v_weight: Tensor, v_bias: Tensor,
                      proj_weight: Tensor, proj_bias: Tensor, num_heads: int, scale: float,
                      need_weights: bool) -> Tuple[Tensor, Tensor]:
    """PyTorch reference of ``readout_infer``, accumulating as the kernel does (float64 stays
    float64): fp32 softmax, probabilities and pooled rows rounded to x's dtype, ``o`` rounded
    before the output projection. Returns (out, attn or an empty tensor)."""
    B, N, D = x.shape
    L = qt.shape[0]
    H, S = num_heads, L // num_heads
    vd = v_weight.shape[0] // H
    s = torch.einsum("ld,bnd->bln", _wide(qt), _wide(x)) * scale
    if eos_indices is not None:
        after = torch.arange(N, device=x.device)[None, :] > eos_indices[:, None]
        s = s.masked_fill(after[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    xp = torch.matmul(p.to(x.dtype).to(s.dtype), _wide(x)).to(x.dtype)  # [B, L, D]
    xp = xp.view(B, H, S, D)
    o = torch.einsum("bhsd,hvd->bhsv", _wide(xp), _wide(v_weight).view(H, vd, D)) + _wide(v_bias).view(1, H, 1, vd)
    o = o.to(x.dtype).reshape(B, L, vd)
    out = torch.nn.functional.linear(_wide(o), _wide(proj_weight), _wide(proj_bias)).to(x.dtype)
    return out, (p.to(x.dtype) if need_weights else x.new_empty((0,)))
