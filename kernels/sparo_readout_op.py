"""PyTorch operators over the SPARO Triton kernels: ``torch.ops.sparo_fast.readout_fwd/bwd``.

Both are ``torch.library.triton_op`` with explicit schemas; every output (and scratch) is
allocated here, outside the kernels, and the kernels are launched through ``wrap_triton``,
so ``torch.compile`` traces them without graph breaks (Inductor sees the kernels on CUDA).
``readout_fwd`` has an autograd formula (``register_autograd``) that calls
``readout_bwd``; both have allocation-only fake implementations.

On a GPU each kernel is a ``triton.autotune`` over the pruned space of
``sparo_readout_autotune.py`` for its shape key, and the backward's token-owner count and the
fused forward's program count are chosen by timing the whole launch at 100%, 67%, 50%, 33% and
25% of one program per SM (``_program_share``); under the Triton CPU interpreter
(``TRITON_INTERPRET=1``, set before this module is imported) the kernels are
``InterpretedFunction`` objects, which cannot be traced: they are
launched directly with the space's first (fixed) config (older torch releases' ``wrap_triton``
reject them), and the ops are kept opaque under ``torch.compile`` (the FunctionalTensorMode
decomposition is replaced by a plain redispatch).

``readout_fwd(x, eos_indices, q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight,
proj_bias, need_weights) -> (out, attn, qt, lse, xp, o)``: the absorbed query ``qt =
W_K[h]^T q_l`` [L, D] is computed inside, *unscaled*, by ``_absorb_kernel`` (the kernels
apply ``1/sqrt(A)`` to the scores); ``k_bias`` is only there to receive its (exactly zero)
gradient; ``attn`` is an empty tensor when ``need_weights`` is false; ``qt``, ``lse`` (fp32
[B, L], log2 domain), ``xp`` (pooled tokens, head-major [Hh, B*S, D]) and ``o`` (pooled
values [B, L, Vd]) are the state saved for the backward. ``readout_bwd(grad_out, grad_attn,
x, eos_indices, q_emb, k_weight, qt, v_weight, proj_weight, lse, xp, o, shared_kv) -> (dx,
dq_emb, dW_K, dW_V, db_V, dW_O, db_O)`` (``dW_V`` empty when ``shared_kv``: it is already in
``dW_K``).

Each kernel has a ``launch_*`` function here (allocation and launch, nothing else), tested
one by one against its ``*_ref`` in ``tests/test_sparo_readout_refs.py``. Launches: forward =
``qt`` (``_absorb_kernel``) + a zero-filled work counter + 1 persistent kernel (pooling and
projections); backward = a zero-filled work counter + 1 persistent kernel (slot, token and
finish stages) + the sum of the finish stage's per-feature-tile ``dq`` partials (one PyTorch
``sum``, written in the parameter's dtype) and, only with separate k/v tensors, a zero-filled
key-bias gradient. The split kernels (``launch_fwd_pool``, ``launch_fwd_proj``,
``launch_bwd_slot``, ``launch_bwd_token``, ``launch_bwd_finish``) are the persistent kernels'
peers in the tests: the same stages, bitwise the same results. On Triton < 3.8 the forward is
``qt`` + the split pool and projection kernels (``fused_forward``: older Tritons' builds of the
persistent forward spill registers in every config).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import sparo_readout_autotune as at
from .sparo_readout_bwd import (DISCARD_GXP, DISCARD_PART, DISCARD_SCR, _bwd_finish_kernel, _bwd_slot_kernel,
                                 _bwd_fused_kernel, _bwd_token_kernel, num_programs, owner_bytes,
                                 programs_forced as bwd_programs_forced)
from .sparo_readout_common import discard_supported, whole_lines
from .sparo_readout_fwd import (_absorb_kernel, _fwd_fused_kernel, _fwd_pool_kernel, _fwd_proj_kernel, dot_precision,
                                 sample_bytes)

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


#: Launch every kernel with its space's first config instead of autotuning (the interpreter
#: always does): the same code in every process, for bitwise comparisons across processes.
FIXED_CONFIGS: bool = False


def _launch(kernel, grid, args, meta, space, key, tag):
    """The interpreter (or ``FIXED_CONFIGS``): the space's first config; a GPU:
    ``triton.autotune`` over the space."""
    if INTERPRETED or FIXED_CONFIGS:
        cfg, w, st = at.split(space[0])
        if callable(grid):
            grid = grid(space[0])
        (kernel if INTERPRETED else wrap_triton(kernel))[grid](*args, **meta, **cfg, num_warps=w, num_stages=st)
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


#: Tests set this to a token tile (a power of two >= 16) to force the tiled (long-sequence)
#: paths of the pool and token kernels at any N; None: the autotune module's choice.
TILED_OVERRIDE: Optional[int] = None
#: The path each token-axis kernel took on its latest launch ("one_tile" / "tiled"), for tests.
LAST_PATHS: Dict[str, str] = {}


def _path_meta(meta: Dict, kernel: str) -> Dict:
    if TILED_OVERRIDE is not None:
        meta = dict(meta, ONE_TILE=False, BN=TILED_OVERRIDE)
    LAST_PATHS[kernel] = "one_tile" if meta["ONE_TILE"] else "tiled"
    return meta


def _fwd_discard(scr: Tensor, meta: Dict) -> bool:
    """The forward's ``DISCARD``: its tiled path's per-sample scores ([L, N] fp32) are dead after
    the pooling pass and may leave L2 without a write-back where they lie on whole lines."""
    return (not meta["ONE_TILE"]) and discard_supported(scr.device) and whole_lines(scr, scr[0].numel() * 4)


def launch_fwd_pool(x: Tensor, eos: Optional[Tensor], qt: Tensor, scale: float, num_heads: int,
                    need_weights: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``_fwd_pool_kernel`` (ref: ``fwd_pool_ref``): (attn or an empty tensor, lse, xp head-major)."""
    B, N, D = x.shape
    L = qt.shape[0]
    meta = _path_meta(at.pool_meta(L, N, D, x.dtype), "pool")
    lse = torch.empty((B, L), device=x.device, dtype=torch.float32)
    scr = lse if meta["ONE_TILE"] else torch.empty((B, L, N), device=x.device, dtype=torch.float32)
    attn = torch.empty((B, L, N) if need_weights else (0,), device=x.device, dtype=x.dtype)
    xp = torch.empty((num_heads, B * (L // num_heads), D), device=x.device, dtype=x.dtype)
    has_eos = eos is not None
    _launch(_fwd_pool_kernel, (B, triton.cdiv(L, meta["BL"])),
            (x, eos.contiguous() if has_eos else lse, qt, scr, attn if need_weights else lse, lse, xp, scale,
             B, N, D, L, L // num_heads, x.stride(0), x.stride(1), x.stride(2)),
            dict(HAS_EOS=has_eos, NEED_WEIGHTS=need_weights, DOT_PREC=dot_precision(x.dtype), UPCAST=_upcast(x),
                 DISCARD=_fwd_discard(scr, meta), **meta),
            at.pool_space(L, N, D, x.dtype), ["N", "D", "L"], (at.n_bucket(N), D, L, x.dtype, has_eos))
    return attn, lse, xp


def launch_fwd_proj(xp: Tensor, v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                    B: int) -> Tuple[Tensor, Tensor]:
    """``_fwd_proj_kernel`` (ref: ``fwd_proj_ref``): (o [B, L, Vd], out [B, L, V])."""
    H, M, D = xp.shape
    S, vd, V = M // B, v_weight.shape[0] // H, proj_weight.shape[0]
    o = xp.new_empty((B, H * S, vd))
    out = xp.new_empty((B, H * S, V))
    meta = at.proj_meta(M, D, vd, V, xp.dtype)
    space = at.proj_space(M, D, vd, V, xp.dtype)

    def grid(m):
        return (triton.cdiv(M, m["BM"]), H)

    _launch(_fwd_proj_kernel, grid,
            (xp, v_weight.contiguous(), v_bias.contiguous(), proj_weight.contiguous(), proj_bias.contiguous(), o,
             out, M, S, H * S, D, vd, V),
            dict(DOT_PREC=dot_precision(xp.dtype), UPCAST=_upcast(xp), **meta), space, ["M", "D", "VD", "V"],
            (D, vd, V, xp.dtype))
    return o, out


#: Under the interpreter the persistent kernels run one program per work item (program t runs
#: the item the t-th ticket would hand out, and nothing waits: the interpreter runs programs in
#: grid order, which is the work order; per-program streams as a GPU's programs would make
#: them, for the L2-aware count); tests set this to run the ticket loop the GPU runs.
INTERPRETER_TICKETS: bool = False


def _tickets() -> bool:
    return not INTERPRETED or INTERPRETER_TICKETS


def fused_programs(items: int, device: torch.device) -> int:
    """The most persistent programs of the fused forward (on a GPU it runs a share of them:
    ``_program_share``): one per SM on a GPU, at most one per work item; 2 under the
    interpreter. One SM cannot hold two: every half-precision config compiled for
    the benchmark shapes takes 192-255 registers a thread at 8 warps (the compile matrix), more
    than half the register file, so a second program per SM would start only when the first
    had finished, find every ticket taken and exit."""
    if device.type != "cuda":
        return min(items, 2)
    return max(1, min(items, torch.cuda.get_device_properties(device).multi_processor_count))


def launch_fwd_fused(x: Tensor, eos: Optional[Tensor], qt: Tensor, scale: float, num_heads: int, need_weights: bool,
                     v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                     programs: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_fwd_fused_kernel`` (refs: ``fwd_pool_ref`` then ``fwd_proj_ref``): (attn or an empty
    tensor, lse, xp head-major, o, out), one launch after a zero-filled work counter, on
    ``programs`` persistent programs (default: ``_program_share``'s choice)."""
    B, N, D = x.shape
    L = qt.shape[0]
    H, S = num_heads, L // num_heads
    vd, V = v_weight.shape[0] // H, proj_weight.shape[0]
    meta = _path_meta(at.fused_meta(L, N, D, vd, V, x.dtype), "pool")
    items = B + H * triton.cdiv(B * S, meta["BM"])
    has_eos = eos is not None
    tag = (at.n_bucket(N), D, L, vd, V, x.dtype, has_eos, need_weights)
    if programs is None and _tickets() and x.device.type == "cuda":
        args = (x, eos, qt, scale, num_heads, need_weights, v_weight, v_bias, proj_weight, proj_bias)
        programs = _program_share("fwd_programs", fused_programs(items, x.device),
                                  lambda p: launch_fwd_fused(*args, programs=p), (x,), (at.m_bucket(B * S), *tag),
                                  sample_bytes(L, N, D, x.element_size(), not meta["ONE_TILE"]))
    lse = torch.empty((B, L), device=x.device, dtype=torch.float32)
    scr = lse if meta["ONE_TILE"] else torch.empty((B, L, N), device=x.device, dtype=torch.float32)
    attn = torch.empty((B, L, N) if need_weights else (0,), device=x.device, dtype=x.dtype)
    xp = torch.empty((H, B * S, D), device=x.device, dtype=x.dtype)
    o, out = x.new_empty((B, L, vd)), x.new_empty((B, L, V))
    sync = torch.zeros((1 + B,), device=x.device, dtype=torch.int32)  # ticket counter, per-sample ready flags
    _launch(_fwd_fused_kernel, ((programs or fused_programs(items, x.device)) if _tickets() else items,),
            (x, eos.contiguous() if has_eos else lse, qt, scr, attn if need_weights else lse, lse, xp,
             v_weight.contiguous(), v_bias.contiguous(), proj_weight.contiguous(), proj_bias.contiguous(), o, out,
             sync, scale, B, N, D, L, S, H, vd, V, x.stride(0), x.stride(1), x.stride(2)),
            dict(HAS_EOS=has_eos, NEED_WEIGHTS=need_weights, DOT_PREC=dot_precision(x.dtype), UPCAST=_upcast(x),
                 TICKETS=_tickets(), DISCARD=_fwd_discard(scr, meta), **meta),
            at.fused_space(L, N, D, vd, V, x.dtype), ["N", "D", "L"], tag)
    return attn, lse, xp, o, out


def launch_absorb(q_emb: Tensor, k_weight: Tensor, shared: bool) -> Tensor:
    """``_absorb_kernel`` (ref: ``absorb_ref``): the absorbed query, unscaled (the kernels apply
    1/sqrt(A)), [H*S, D] in the weight's dtype; ``shared``: k and v share the weight (kept in L2)."""
    _, H, S, _, A = q_emb.shape
    D = k_weight.shape[1]
    qt = k_weight.new_empty((H * S, D))
    space = at.absorb_space(S, A, D)
    args = (q_emb.to(k_weight.dtype).contiguous(), k_weight.contiguous(), qt, S, A, D)
    _launch(_absorb_kernel, (H, triton.cdiv(D, space[0]["BD"])), args,
            dict(W_EVICT="evict_last" if shared else "evict_first"), space, ["D"], (S, A, D, k_weight.dtype, shared))
    return qt


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two weights are one tensor's memory (False for tensors without storage, e.g. fake)."""
    try:
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape
    except (RuntimeError, NotImplementedError):
        return False


#: The oldest Triton whose build of the persistent forward spills nothing at the benchmark
#: shapes in half precision on sm_90: Triton 3.4 spilled 308-376 bytes in every config at
#: vit_b16, Triton 3.6 16-84 (compile matrix); the split pool and projection kernels none.
FUSED_FORWARD_MIN_TRITON = (3, 8)


def fused_forward() -> bool:
    """Whether the forward is the persistent launch (else the two split kernels: the same number
    of launches, the work counter's zero fill replaced by the second kernel)."""
    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= FUSED_FORWARD_MIN_TRITON


def _readout_fwd(x: Tensor, eos_indices: Optional[Tensor], q_emb: Tensor, k_weight: Tensor, k_bias: Tensor,
                v_weight: Tensor, v_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor,
                need_weights: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, N, D = x.shape
    _, H, S, _, A = q_emb.shape
    qt = launch_absorb(q_emb, k_weight, shared=_same_memory(k_weight, v_weight))
    if fused_forward():
        attn, lse, xp, o, out = launch_fwd_fused(x, eos_indices, qt, float(A) ** -0.5, H, need_weights, v_weight,
                                                 v_bias, proj_weight, proj_bias)
    else:
        attn, lse, xp = launch_fwd_pool(x, eos_indices, qt, float(A) ** -0.5, H, need_weights)
        o, out = launch_fwd_proj(xp, v_weight, v_bias, proj_weight, proj_bias, B)
    return out, attn, qt, lse, xp, o


def launch_bwd_slot(g: Tensor, o: Tensor, xp: Tensor, v_weight: Tensor, proj_weight: Tensor
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_bwd_slot_kernel`` (ref: ``bwd_slot_ref``): (gxp head-major, dW_V, db_V, per-head dW_O and
    db_O partials in fp32)."""
    B, L, V = g.shape
    H, M, D = xp.shape
    S, vd = M // B, v_weight.shape[0] // H
    v_weight = v_weight.contiguous()
    gxp = torch.empty_like(xp)
    dwv = torch.empty_like(v_weight)
    dbv = v_weight.new_empty((H * vd,))
    dwo_p = torch.empty((H, V, vd), device=g.device, dtype=torch.float32)
    dbo_p = torch.empty((H, V), device=g.device, dtype=torch.float32)
    meta = at.slot_meta(M, D, vd, V, xp.dtype)
    space = at.slot_space(M, D, vd, V, xp.dtype)

    def grid(m):
        return (H, triton.cdiv(D, m["BD"]))

    _launch(_bwd_slot_kernel, grid,
            (g.contiguous(), o, xp, v_weight, proj_weight.contiguous(), gxp, dwv, dbv, dwo_p, dbo_p,
             B, S, L, D, vd, V),
            dict(DOT_PREC=dot_precision(xp.dtype), UPCAST=_upcast(xp), **meta), space, ["M", "D", "VD", "V"],
            (D, vd, V, xp.dtype))
    return gxp, dwv, dbv, dwo_p, dbo_p


def launch_bwd_token(x: Tensor, eos: Optional[Tensor], lse: Tensor, ga: Optional[Tensor], gxp: Tensor, qt: Tensor,
                     scale: float) -> Tuple[Tensor, Tensor]:
    """``_bwd_token_kernel`` (ref: ``bwd_token_ref``): (dx, the P per-program fp32 dqt partials)."""
    B, N, D = x.shape
    L = qt.shape[0]
    P = num_programs(B, x.device)
    meta = _path_meta(at.bwd_meta(L, N, D, x.dtype), "token")
    scr = lse if meta["ONE_TILE"] else torch.empty((P, 2, L, N), device=x.device, dtype=torch.float32)
    dx = torch.empty((B, N, D), device=x.device, dtype=x.dtype)
    part = torch.empty((P, L, D), device=x.device, dtype=torch.float32)
    has_ga, has_eos = ga is not None, eos is not None
    ga = ga if has_ga else lse.view(B, L, 1)
    _launch(_bwd_token_kernel, (P,),
            (x, eos.contiguous() if has_eos else lse, lse, ga, gxp, qt, scr, dx, part, scale, B, N, D, L,
             gxp.shape[1] // B, P, x.stride(0), x.stride(1), x.stride(2), ga.stride(0), ga.stride(1), ga.stride(2)),
            dict(HAS_EOS=has_eos, HAS_GA=has_ga, DOT_PREC=dot_precision(x.dtype), UPCAST=_upcast(x), **meta),
            at.bwd_space(L, N, D, x.dtype), ["N", "D", "L"], (at.n_bucket(N), D, L, x.dtype, has_eos, has_ga))
    return dx, part


def launch_bwd_finish(part: Tensor, q_emb: Tensor, k_weight: Tensor, dwv: Tensor, dwo_p: Tensor, dbo_p: Tensor,
                      shared_kv: bool, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_bwd_finish_kernel`` (ref: ``bwd_finish_ref``), then the one PyTorch sum of its dq
    partials: (dq_emb, dW_K (+ dW_V when shared), dW_O, db_O)."""
    P, L, D = part.shape
    _, H, S, _, A = q_emb.shape
    _, V, vd = dwo_p.shape
    cfg, w, st = at.split(at.finish_space(S, A, D)[0])
    tiles = triton.cdiv(D, cfg["BD"])
    dq_p = torch.empty((tiles, L, A), device=part.device, dtype=torch.float32)
    dwk = torch.empty_like(k_weight)
    dwo = torch.empty((V, vd), device=part.device, dtype=dtype)
    dbo = torch.empty((V,), device=part.device, dtype=dtype)
    fin = _bwd_finish_kernel if INTERPRETED else wrap_triton(_bwd_finish_kernel)
    fin[(H, tiles)](part, q_emb.contiguous(), k_weight.contiguous(), dwv, dwo_p, dbo_p, dq_p, dwk, dwo, dbo,
                    P, H, S, A, D, V, vd, triton.cdiv(V, H * tiles), SHARED=shared_kv,
                    **at.finish_meta(S, A, H, vd, V), **cfg, num_warps=w, num_stages=st)
    # a fixed-order sum over the few feature tiles (deterministic), written in the parameter's
    # dtype by the same launch
    dq = torch.empty(q_emb.shape, device=part.device, dtype=q_emb.dtype)
    torch.sum(dq_p, 0, out=dq.view(L, A))
    return dq, dwk, dwo, dbo


def launch_bwd_fused(g: Tensor, o: Tensor, xp: Tensor, v_weight: Tensor, proj_weight: Tensor, x: Tensor,
                     eos: Optional[Tensor], lse: Tensor, ga: Optional[Tensor], qt: Tensor, scale: float,
                     q_emb: Tensor, k_weight: Tensor, shared_kv: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_bwd_fused_kernel`` (refs: ``bwd_slot_ref``, ``bwd_token_ref``, ``bwd_finish_ref``), then
    the one PyTorch sum of its dq partials: (dx, dq_emb, dW_K (+ dW_V when shared), dW_V, db_V,
    dW_O, db_O); when shared, the dW_V returned is the dW_K tensor itself (formed there in place)."""
    args = (g, o, xp, v_weight, proj_weight, x, eos, lse, ga, qt, scale, q_emb, k_weight, shared_kv)
    tag = _bwd_tag(x, q_emb, v_weight, proj_weight, eos, ga, shared_kv)
    B, N, D = x.shape
    tiled = not at.bwd_meta(qt.shape[0], N, D, x.dtype)["ONE_TILE"]
    P = _program_share("bwd_owners", num_programs(B, x.device), lambda p: launch_bwd_fused_on(p, tag, *args), args,
                       tag, owner_bytes(qt.shape[0], N, D, x.element_size(), tiled), bwd_programs_forced())
    return launch_bwd_fused_on(P, tag, *args)


def _bwd_tag(x: Tensor, q_emb: Tensor, v_weight: Tensor, proj_weight: Tensor, eos: Optional[Tensor],
             ga: Optional[Tensor], shared_kv: bool) -> tuple:
    """The fused backward's launch key beyond its runtime key arguments (autotune's ``tag``)."""
    B, N, D = x.shape
    _, H, S, _, _ = q_emb.shape
    return (at.n_bucket(N), at.m_bucket(B * S), D, H * S, v_weight.shape[0] // H, proj_weight.shape[0],
            x.dtype, eos is not None, ga is not None, shared_kv)


def _program_share(kind: str, programs: int, run, tensors, tag: tuple, per_item: int, forced: bool = False) -> int:
    """A persistent launch's program count out of ``programs`` (one per SM): the fastest choice of
    ``at.owner_space`` when timing the whole launch (``run(p)``) on this GPU, chosen once per key
    (``kind`` and ``tag``), shared across ranks and cached on disk like a kernel config; untimed
    (the interpreter, fixed configs, tracing) the largest choice whose samples in flight
    (``per_item`` bytes each) fit the L2 (``at.default_owners``). A ``forced`` count is taken as
    it is."""
    if forced or programs < 2:
        return programs
    default = at.default_owners(programs, per_item)
    if INTERPRETED or FIXED_CONFIGS:
        return default
    key = "|".join([kind, *map(str, tag)])
    bench = None if at._tracing(tensors) else (lambda cfg: _time(lambda: run(at.owners(programs, cfg))))
    cfg = at.choose(kind, key, at.owner_space(), bench)
    return at.owners(programs, cfg) if cfg is not None else default


def _time(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn)


def _bwd_discards(gxp: Tensor, scr: Optional[Tensor], part: Tensor) -> int:
    """``_bwd_fused_kernel``'s ``DISCARD`` bits: the dead scratch it may drop from L2 (rows on
    whole lines, a GPU that has the instruction; ``scr``: the tiled path's per-owner scratch)."""
    if not discard_supported(gxp.device):
        return 0
    D = gxp.shape[-1]
    bits = DISCARD_GXP if whole_lines(gxp, D * gxp.element_size()) else 0
    if scr is not None and whole_lines(scr, scr[0].numel() * 4):
        bits |= DISCARD_SCR
    return bits | (DISCARD_PART if whole_lines(part, D * 4) else 0)


def launch_bwd_fused_on(P: int, tag: tuple, g: Tensor, o: Tensor, xp: Tensor, v_weight: Tensor, proj_weight: Tensor,
                        x: Tensor, eos: Optional[Tensor], lse: Tensor, ga: Optional[Tensor], qt: Tensor,
                        scale: float, q_emb: Tensor, k_weight: Tensor, shared_kv: bool
                        ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``launch_bwd_fused`` with ``P`` token owners (persistent programs); ``tag``: ``_bwd_tag``."""
    B, N, D = x.shape
    L = qt.shape[0]
    _, H, S, _, A = q_emb.shape
    V, vd = proj_weight.shape[0], v_weight.shape[0] // H
    meta = _path_meta(at.bwd_fused_meta(L, N, D, S, A, H, vd, V, B, x.dtype), "token")
    tiles, stiles = triton.cdiv(D, meta["BDF"]), triton.cdiv(D, meta["BDS"])
    f32 = dict(device=x.device, dtype=torch.float32)
    scr = lse if meta["ONE_TILE"] else torch.empty((P, 2, L, N), **f32)
    v_weight = v_weight.contiguous()
    gxp, dx = torch.empty_like(xp), torch.empty((B, N, D), device=x.device, dtype=x.dtype)
    dwk, dbv = torch.empty_like(k_weight), v_weight.new_empty((H * vd,))
    # shared weight: the batch sums write dW_V into dW_K's buffer and each finish tile adds its
    # dW_K tile in place (the same elements, read before written by one program): no separate
    # dW_V scratch that L2 would write back to DRAM once it is dead
    dwv = dwk if shared_kv else torch.empty_like(v_weight)
    dwo_p, dbo_p = torch.empty((H, V, vd), **f32), torch.empty((H, V), **f32)
    part, dq_p = torch.empty((P, L, D), **f32), torch.empty((tiles, L, A), **f32)
    dwo, dbo = proj_weight.new_empty((V, vd)), proj_weight.new_empty((V,))
    R = triton.cdiv(B, P)  # rounds of P samples
    # ticket counter, owner items done, batch-sum tiles done, gxp items done per round, rounds done per owner
    sync = torch.zeros((3 + R + P,), device=x.device, dtype=torch.int32)
    has_ga, has_eos = ga is not None, eos is not None
    ga = ga if has_ga else lse.view(B, L, 1)
    _launch(_bwd_fused_kernel, (P if _tickets() else R * (H + P) + H * stiles + H * tiles,),
            (g.contiguous(), o, xp, v_weight, proj_weight.contiguous(), gxp, dwv, dbv, dwo_p, dbo_p,
             x, eos.contiguous() if has_eos else lse, lse, ga, qt, scr, dx, part,
             q_emb.contiguous(), k_weight.contiguous(), dq_p, dwk, dwo, dbo, sync,
             scale, B, N, D, L, S, P, H, A, V, vd, triton.cdiv(V, H * tiles), tiles, stiles,
             x.stride(0), x.stride(1), x.stride(2), ga.stride(0), ga.stride(1), ga.stride(2)),
            dict(HAS_EOS=has_eos, HAS_GA=has_ga, SHARED=shared_kv, DOT_PREC=dot_precision(x.dtype), UPCAST=_upcast(x),
                 TICKETS=_tickets(), DISCARD=_bwd_discards(gxp, None if meta["ONE_TILE"] else scr, part),
                 ITEM_CALLS=at.item_calls(x.dtype), **meta),
            at.bwd_fused_space(L, N, D, S, A, H, vd, V, B, x.dtype), ["N", "D", "L"],
            tag)
    # a fixed-order sum over the few feature tiles (deterministic), in the parameter's dtype
    dq = torch.empty(q_emb.shape, device=x.device, dtype=q_emb.dtype)
    torch.sum(dq_p, 0, out=dq.view(L, A))
    return dx, dq, dwk, dwv, dbv, dwo, dbo


def _readout_bwd(grad_out: Tensor, grad_attn: Optional[Tensor], x: Tensor, eos_indices: Optional[Tensor],
                q_emb: Tensor, k_weight: Tensor, qt: Tensor, v_weight: Tensor, proj_weight: Tensor, lse: Tensor,
                xp: Tensor, o: Tensor, shared_kv: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    A = q_emb.shape[-1]
    # one launch: slot level (go, gxp, dW_V, db_V, per-head dW_O / db_O partials), token level
    # (persistent owners with per-owner dqt partials), weight level (dqt reduction in a fixed
    # order, dq_emb, dW_K (+ dW_V when shared), dW_O, db_O)
    dx, dq, dwk, dwv, dbv, dwo, dbo = launch_bwd_fused(grad_out, o, xp, v_weight, proj_weight, x, eos_indices, lse,
                                                       grad_attn, qt, float(A) ** -0.5, q_emb, k_weight, shared_kv)
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


# the inference op (no autograd, cached absorbed query) lives in its own kernel file
from . import sparo_readout_infer  # noqa: E402,F401  registers torch.ops.sparo_fast.readout_infer
