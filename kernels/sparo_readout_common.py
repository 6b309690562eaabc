"""Jit helpers shared by the forward and backward SPARO kernels (one family, one name each).

* ``_dot``: ``tl.dot`` with fp32 accumulation (and the interpreter's bf16 work-around);
* ``_n_valid``: how many leading tokens of a sample are valid (the EOS mask);
* ``_xp_rows``: rows of the head-major ``[Hh, B*S, D]`` layout;
* ``_discard_lines``: drop dead scratch lines from L2 without writing them back;
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
#: bytes of an L2 line: the only size ``discard.global.L2`` takes
LINE = 128


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
def _discard_lines(ptrs, mask, DISCARD: tl.constexpr):
    """Drop the 128-byte L2 lines starting at ``ptrs`` (where ``mask``) without writing them back
    (PTX ``discard.global.L2``, sm_80+): scratch a launch wrote, read for the last time, would
    otherwise go back to DRAM when evicted. The instruction is a weak write of undefined values,
    so only for lines wholly inside scratch nobody reads again before writing it, after a barrier
    that orders every thread's last loads of them. ``DISCARD`` false (``discard_supported``): a
    no-op. The Triton interpreter runs no assembly: ``interpreter_trace`` turns this block into
    a no-op that its listeners see as a discard of each line."""
    if DISCARD:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $1, 0; @p discard.global.L2 [$2], 128; mov.u32 $0, 0; }",
            "=r,r,l", [mask.to(tl.int32), ptrs.to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _discard_rows(BASE, rows, rmask, D, DISCARD: tl.constexpr):
    """Discard the lines of rows ``rows`` (int64, ``D`` elements each, on whole lines: see
    ``whole_lines``) where ``rmask``, after a barrier that ends this program's reads of them."""
    if DISCARD:
        tl.debug_barrier()
        E = 1024 // BASE.dtype.element_ty.primitive_bitwidth  # elements per line
        for c0 in range(0, D, 16 * E):
            cols = c0 + tl.arange(0, 16) * E
            _discard_lines(BASE + rows[:, None] * D + cols[None, :], rmask[:, None] & (cols < D)[None, :], True)


@triton.jit
def _discard_span(BASE, n, DISCARD: tl.constexpr):
    """Discard the whole lines of the ``n`` elements from ``BASE`` (line-aligned), after a barrier."""
    if DISCARD:
        tl.debug_barrier()
        E = 1024 // BASE.dtype.element_ty.primitive_bitwidth
        for c0 in range(0, n, 16 * E):
            cols = c0 + tl.arange(0, 16) * E
            _discard_lines(BASE + cols, cols + E <= n, True)


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


#: Set (True/False) to decide ``discard_supported`` without a device: the compile matrix captures
#: its launches on meta tensors for sm_80+ targets.
DISCARD_OVERRIDE = None


def discard_supported(device) -> bool:
    """Whether kernels on ``device`` may issue L2 line discards: NVIDIA sm_80 and later, and the
    Triton interpreter (where they are no-ops that the byte counts see). Asked at launch time."""
    import os

    import torch

    if DISCARD_OVERRIDE is not None:
        return DISCARD_OVERRIDE
    if os.environ.get("TRITON_INTERPRET") == "1":
        interpreter_discards()
        return True
    dev = torch.device(device)
    return dev.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(dev) >= (8, 0)


def whole_lines(t, row_bytes: int) -> bool:
    """Whether rows of ``row_bytes`` starting at ``t``'s first element fall on whole L2 lines
    (so that discarding a row's lines drops nothing of its neighbours). Off the GPU (the
    interpreter) the offset within the storage decides: storages there stand for GPU
    allocations, which start on 512-byte boundaries."""
    start = t.data_ptr() if t.device.type == "cuda" else t.storage_offset() * t.element_size()
    return start % LINE == 0 and row_bytes % LINE == 0


def next_pow2(n: int, lo: int = 16, hi=None) -> int:
    """Block size for an extent: the next power of two, at least ``lo`` (and at most ``hi``)."""
    v = max(lo, triton.next_power_of_2(int(n)))
    return v if hi is None else min(v, hi)


def _wide(t):
    """The refs' accumulation dtype: float64 stays float64 (a float64 truth), the rest float32."""
    import torch

    return t if t.dtype == torch.float64 else t.float()


# ----------------------------------------------------------------------------- the interpreter
#: The PTX instruction of ``_discard_lines`` (how the interpreter's hooks recognise its asm block).
DISCARD_ASM = "discard.global.L2"
_INTERPRETER_DISCARDS = []


class _AsmResults:
    """What ``tl.inline_asm_elementwise`` reads back from the builder: ``get_result(i)``."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def get_result(self, i):
        return self.handle


def interpreter_discards() -> None:
    """Let the Triton interpreter, which runs no assembly, take ``_discard_lines``' asm block as a
    no-op (installed once; other asm blocks still fail there). ``testing.interpreter_trace``
    wraps it to show the discards to its listeners."""
    if _INTERPRETER_DISCARDS:
        return
    import numpy as np
    from triton.runtime import interpreter as interp

    orig = interp.InterpreterBuilder.create_inline_asm

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        if DISCARD_ASM not in asm:
            return orig(self, asm, constraints, values, types, is_pure, pack)
        return _AsmResults(interp.TensorHandle(np.zeros(np.shape(values[1].data), np.int32), interp.tl.int32))

    interp.InterpreterBuilder.create_inline_asm = create_inline_asm
    _INTERPRETER_DISCARDS.append(True)
