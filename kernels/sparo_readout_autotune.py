"""Launch configurations of the SPARO kernels: device-aware pruned spaces, and how one is chosen.

Each kernel has

* **fixed meta-parameters**, set by the shape and the device and never tuned: the slot block
  ``BL`` (all slots, next power of two), the token tile ``BN`` and the ``ONE_TILE`` path (the
  whole sequence in one register tile when ``next_pow2(N)`` is small enough *and* that path's
  smallest config fits the device's shared memory; else the tiled path with a score scratch),
  the value blocks of the projection kernel;
* a **space** of configs (feature tile ``BD`` / row tile ``BM``, ``num_warps``,
  ``num_stages``), pruned in Python from the shape features that matter, **(N bucket, D, L,
  dtype)**, and from the device: register estimates (an fp32 [BL, BN] tile costs
  BL*BN/(32*warps) registers per thread, thresholds calibrated with ptxas), tiles no wider than
  the problem, and the shared memory per block (``smem_*`` below: formulas fitted to the bytes
  Triton allocates, checked against every compiled config by ``tests/test_sparo_readout_autotune.py``
  and ``bench/results/compile-matrix.json``) against the device's opt-in limit (99 kB on
  sm_86/sm_89/sm_120, 163 kB on sm_80, 227 kB on sm_90/sm_100). Every space ends with a
  fallback that fits 99 kB.

The device is queried once per CUDA device, lazily, the first time a space is built
(``device_limits``), never at import. Without a CUDA device (the Triton CPU interpreter) the
limit is the H100's (a 200 kB cap) and the interpreter runs each space's first config.

**Choosing a config** (``launch``), per key = (kernel, N bucket or the other shape features,
dtype, flags) -- exact N and the batch size are not part of it (the row count ``M = B*S`` of
the slot-level kernels enters as a power-of-two bucket capped at 4096):

1. a pinned config: ``pin(kernel, **cfg)`` or ``SPARO_FAST_CONFIG="bwd_token:BD=16,num_warps=8,
   num_stages=1;fwd_pool:BD=64,num_warps=8,num_stages=2"`` (kernel names with or without the
   leading ``_`` and ``_kernel``);
2. this process's earlier choice;
3. under ``torch.distributed``, the choice another rank already published in the process
   group's key-value store;
4. the on-disk cache ``~/.cache/sparo-fast/autotune/<device>-triton<v>-torch<v>-sparo<v>.json``
   (``SPARO_FAST_CACHE_DIR`` moves it);
5. else every config of the pruned space is timed (``triton.testing.do_bench``) and the
   fastest config that ptxas compiled without spilling registers wins (the compiled kernel's
   ``n_spills`` on this GPU; the fastest of all only when every config spills). The rules
   above prune what spilled across architectures in the compile matrix; what spills on one
   architecture or Triton version only is caught here, on the user's own GPU.

The backward's token-owner count and the fused forward's program count are chosen the same way
(2-5) as the configs of pseudo-kernels ``bwd_owners`` and ``fwd_programs`` whose space is
``owner_space`` (a share of one program per SM), timed by running the whole launch
(``sparo_readout_op._program_share``).

A choice made by 4 or 5 is published with the store's ``compare_set`` (first writer wins) and
every rank then uses the stored value, so all ranks run the same config (bitwise the same
arithmetic) without any collective: a rank that meets a new key alone (a last, smaller batch)
never waits for the others. The winner is written to the disk cache (atomically), so the next
process tunes nothing. While ``torch.compile`` traces (fake tensors, nothing can be timed) an
unknown key is handed to ``triton.autotune`` over the pruned space (Inductor tunes it).

No kernel accumulates into memory it did not write in the same launch (the backward's ``dqt``
partials are stored outright for a program's first sample), so re-running a config while
tuning is harmless, except for the work counters of the two persistent kernels
(``RESET_ARGS``), which every timing run zeroes first (``reset_to_zero`` under Inductor).

``python -m sparo_fast_kernels.testing.aot_check --arch ARCH`` compiles every config of every
space for any GPU architecture without a GPU, under the same pruning.
"""
from __future__ import annotations

import itertools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton

from .sparo_readout_fwd import _p2

_SMEM = 200 * 1024       # the budget without a device (H100's 227 kB less headroom): the interpreter's
_SMALL_SMEM = 99 * 1024  # the smallest opt-in limit of the supported GPUs: every fallback fits it
_REG_TILE = 64  # fp32 registers per thread one [BL, BN] score-sized tile may take (calibrated with ptxas)

#: Opt-in shared memory per block by compute capability (CUDA programming guide, technical
#: specifications): used for ``aot_check --arch`` and when a device does not report it.
ARCH_SMEM = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
             100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024}
#: Streaming multiprocessors of a typical part per architecture (aot_check's persistent grid).
ARCH_SMS = {80: 108, 86: 84, 87: 16, 89: 142, 90: 132, 100: 148, 103: 148, 120: 170, 121: 48}


# ----------------------------------------------------------------------------- the device
@dataclass(frozen=True)
class DeviceLimits:
    """What the spaces are pruned against: one CUDA device (or an architecture for aot_check)."""
    name: str
    arch: int                 # 10 * major + minor
    smem: int                 # opt-in shared memory per block, bytes
    regs: int = 65536         # 32-bit registers per block
    max_threads: int = 1024
    sms: int = 132
    l2: int = 50_000_000      # L2 bytes (an H100's 50 MB where unknown)


def limits_for_arch(arch: int) -> DeviceLimits:
    if arch not in ARCH_SMEM:
        raise ValueError(f"unknown CUDA architecture sm_{arch}; known: {sorted(ARCH_SMEM)}")
    return DeviceLimits(f"sm_{arch}", arch, ARCH_SMEM[arch], sms=ARCH_SMS[arch])


def limits_from_props(props) -> DeviceLimits:
    """``torch.cuda.get_device_properties(i)`` (or any object with its attributes) -> limits."""
    arch = 10 * props.major + props.minor
    smem = getattr(props, "shared_memory_per_block_optin", 0) or ARCH_SMEM.get(arch, _SMALL_SMEM)
    return DeviceLimits(props.name, arch, int(smem), regs=int(getattr(props, "regs_per_multiprocessor", 65536)),
                        max_threads=int(getattr(props, "max_threads_per_block", 1024)),
                        sms=int(props.multi_processor_count),
                        l2=int(getattr(props, "L2_cache_size", 0) or DeviceLimits.l2))


_ASSUMED: List[Optional[DeviceLimits]] = []
_QUERIED: Dict[int, DeviceLimits] = {}


class assume:
    """``with assume(limits):`` prune every space for ``limits`` (``None``: no device, the 200 kB
    cap) instead of the current CUDA device: aot_check's matrix and the unit tests use it."""

    def __init__(self, limits: Optional[DeviceLimits]):
        self.limits = limits

    def __enter__(self):
        _ASSUMED.append(self.limits)
        return self.limits

    def __exit__(self, *exc):
        _ASSUMED.pop()


def device_limits() -> Optional[DeviceLimits]:
    """The limits the spaces are pruned for: an ``assume``d one, else the current CUDA device's
    (queried once per device), else ``None`` (no CUDA device, or the Triton interpreter)."""
    if _ASSUMED:
        return _ASSUMED[-1]
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    if idx not in _QUERIED:
        _QUERIED[idx] = limits_from_props(torch.cuda.get_device_properties(idx))
    return _QUERIED[idx]


def item_calls(dtype: torch.dtype) -> bool:
    """Whether a persistent kernel may run its work items as calls of non-inlined functions:
    everywhere but in half precision on sm_100/103 (Triton cannot call a function that uses
    tensor memory, which only the half-precision products there use; float32 runs FMAs)."""
    lim = device_limits()
    return lim is None or lim.arch // 10 != 10 or not _half(dtype)


def smem_budget() -> int:
    lim = device_limits()
    return _SMEM if lim is None else lim.smem


def _fits(smem: int, warps: int) -> bool:
    lim = device_limits()
    return smem <= smem_budget() and (lim is None or 32 * warps <= lim.max_threads)


def _half(dtype: torch.dtype) -> bool:
    return dtype != torch.float32


def _esize(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def n_bucket(N: int) -> int:
    """The token-count feature of the keys: next power of two (>= 16)."""
    return _p2(N)


def m_bucket(M: int) -> int:
    """The row-count (B*S) feature of the slot-level keys: next power of two, capped at 4096
    (past it every config has enough row tiles to fill the GPU)."""
    return min(_p2(M), 4096)


# ----------------------------------------------------------------------------- shared memory
# Bytes of shared memory Triton allocates for one config: pipelined operand tiles (stages x
# tiles) or, for the single-stage kernels, the largest layout-conversion scratch. Each formula
# is an upper bound of what Triton 3.4-3.8 allocated on sm_80 to sm_120 for every config of the
# compile matrix (tests/test_sparo_readout_autotune.py checks it against the committed matrix).
def _staged_operands() -> bool:
    """Hopper's wgmma and Blackwell's tcgen05 read both operands from shared memory (so the
    probabilities are staged there too); sm_8x/sm_12x's mma.sync reads registers. Unknown
    device: assume the larger."""
    lim = device_limits()
    return lim is None or 90 <= lim.arch < 120


def smem_pool(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    BL, BN, BD, e, st = meta["BL"], meta["BN"], cfg["BD"], _esize(dtype), cfg["num_stages"]
    if not meta["ONE_TILE"]:
        return st * (BN + BL) * BD * e + 2 * BL * BN * 4  # the score scratch tile is pipelined too
    if _half(dtype) and _staged_operands():  # x and qt tiles, and the [BL, BN] probabilities
        return max(max(st, 2) * (BN + BL) * BD * e + BL * BN * e, BL * BN * 4)
    # mma.sync: x and qt tiles, or the fp32 score block re-laid out (twice for fp32 FMA products)
    return max(st * (BN + BL) * BD * e, BL * BN * 4 * (1 if _half(dtype) else 2)) + 2 * BL * BD * e


def smem_proj(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    e = _esize(dtype)
    BM, BVD = cfg["BM"], meta["BVD"]  # plus o [BM, BVD] staged as the second product's operand (wgmma)
    tiles = cfg["num_stages"] * (BM + BVD) * cfg["BD"] * e + BM * max(BVD, meta["BVO"]) * 4 + BM * BVD * e
    return tiles + 1024  # barriers (and sm_100's tensor-memory address): 144 bytes seen


def smem_bwd(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    BL, BN, BD, e = meta["BL"], meta["BN"], cfg["BD"], _esize(dtype)
    tiles = cfg["num_stages"] * (BN + 2 * BL) * BD * e
    return max(tiles, BN * BD * e) + BL * BN * (4 + e) + BN * BD * e


def smem_slot(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    e = _esize(dtype)
    BM, BD, BVD, BV = cfg["BM"], cfg["BD"], meta["BVD"], meta["BV"]
    return max(2, cfg["num_stages"]) * (BM * (BVD + BV) + BVD * BD) * e + BM * (max(BD, BVD) + BV) * 4


def smem_finish(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    return 2 * ((meta["BA"] + meta["BS"]) * cfg["BD"] + meta["BH"] * meta["BVD"]) * 4


# ----------------------------------------------------------------------------- forward pool
def _pool_one_tile(BL: int, BN: int, dtype: torch.dtype) -> bool:
    one_max = 256 if _half(dtype) else 64  # 16 warps cap registers at 128: no help; fp32 dots need more
    if BN * BL > 64 * one_max:  # the [BL, BN] fp32 score block must fit the registers (8 warps)
        return False
    smallest = dict(BD=16, num_warps=8, num_stages=1)
    return smem_pool(dict(BL=BL, BN=BN, ONE_TILE=True), smallest, dtype) <= smem_budget()


def pool_meta(L: int, N: int, D: int, dtype: torch.dtype) -> Dict:
    BN, BL = _p2(N), _p2(L)
    one = _pool_one_tile(BL, BN, dtype)
    return dict(BL=BL, BN=BN if one else (64 if _half(dtype) and BL <= 64 else 32), ONE_TILE=one)


def pool_space(L: int, N: int, D: int, dtype: torch.dtype) -> List[Dict]:
    m = pool_meta(L, N, D, dtype)
    BL, BN = m["BL"], m["BN"]
    # the long path re-reads its score scratch once per feature tile: widest tile first
    bds = ((64, 32, 128, 16) if m["ONE_TILE"] else (128, 64, 32)) if _half(dtype) else (32, 16)
    out = []
    for bd, w, st in itertools.product(bds, (8, 4), (2, 3, 1)):
        if bd > max(16, _p2(D)) or (st == 1 and bd != 16):  # one stage: only the smallest tile, for small GPUs
            continue
        tiles = 1 + (0 if m["ONE_TILE"] else 1)  # the score tile (and the long path's acc tile)
        if BL * BN * tiles / (32 * w) > _REG_TILE or BL * bd / (32 * w) > 64:
            continue
        if not m["ONE_TILE"] and (w < 8 or BL * bd > 8192):  # ptxas spilled these (vit_l14, L = 128)
            continue
        cfg = dict(BD=bd, num_warps=w, num_stages=st)
        if _fits(smem_pool(m, cfg, dtype), w):
            out.append(cfg)
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


# ----------------------------------------------------------------------------- forward proj
def proj_meta(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    return dict(BVD=_p2(VD), BVO=_p2(V, hi=64 if _half(dtype) else 32))


def proj_space(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> List[Dict]:
    m = proj_meta(M, D, VD, V, dtype)
    out = []
    for bm, bd, w, st in itertools.product((64, 128, 32), (64, 32, 16), (8, 4), (3, 2)):
        if bm > max(16, _p2(M)) * 2 or bd > max(16, _p2(D)) or (bd == 16 and (bm != 64 or st != 2)):
            continue
        if _half(dtype) and bm < 64 and M >= 64:  # wgmma needs 64-row tiles (32 rows: mma.sync)
            continue
        if bm * m["BVD"] / (32 * w) > 64 or bm * m["BVO"] / (32 * w) > 64:  # o and one y tile in registers
            continue
        if not _half(dtype) and bd > 32:
            continue
        cfg = dict(BM=bm, BD=bd, num_warps=w, num_stages=st)
        if _fits(smem_proj(m, cfg, dtype), w):
            out.append(cfg)
    return out or [dict(BM=16, BD=16, num_warps=4, num_stages=1)]


# ----------------------------------------------------------------------------- absorbed query
def absorb_space(S: int, A: int, D: int) -> List[Dict]:
    """One config: the [BS, BA, BD] product of ``_absorb_kernel`` kept at <= 8192 fp32 values
    (64 per thread at 4 warps); a weight-only product of a few microseconds, nothing to tune."""
    bs, ba = _p2(S, lo=2), _p2(A, lo=16, hi=64)
    bd = max(16, min(128, 8192 // (bs * ba)))  # a power of two: so are bs and ba
    return [dict(BS=bs, BA=ba, BD=bd, num_warps=4, num_stages=1)]


def smem_absorb(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    """An upper bound: the fp32 [BS, BA, BD] product, were the reduction over A staged whole."""
    return cfg["BS"] * cfg["BA"] * cfg["BD"] * 4


# ----------------------------------------------------------------------------- forward fused
def fused_meta(L: int, N: int, D: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    """The pool's meta-parameters plus the projection's, its row tile ``BM`` fixed (the work
    order is built from it before the launch) and its feature tile ``BDP`` fixed."""
    pm = proj_meta(1, D, VD, V, dtype)
    return dict(pool_meta(L, N, D, dtype), BM=64 if _half(dtype) else 32, BDP=64 if _half(dtype) else 32,
                BVD=pm["BVD"], BVO=pm["BVO"])


def smem_fused(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    """One program runs either phase: the larger of the two allocations."""
    proj = dict(BM=meta["BM"], BD=meta["BDP"], num_stages=cfg["num_stages"])
    return max(smem_pool(meta, cfg, dtype), smem_proj(meta, proj, dtype))


def fused_space(L: int, N: int, D: int, VD: int, V: int, dtype: torch.dtype) -> List[Dict]:
    """The pool's space (the heavier phase), less configs whose warps cannot hold the
    projection's o and y tiles in registers or whose shared memory does not fit."""
    m = fused_meta(L, N, D, VD, V, dtype)
    # Triton 3.8, ptxas -v: with the projection in the same kernel, 4 warps spilled at vit_b32 and
    # text_b (8-120 bytes on sm_80, 90, 100, 120); feature tile x stages above 128 spilled at
    # vit_b16 (92-548 bytes), and above 64 when the [L, N] score block takes 64 registers per
    # thread (vit_b16: BD 64 at 2 stages 16-76 bytes, BD 32 at 3 stages 44-124). What still
    # spills on one architecture only is left to the autotuner's spill check (``choose``).
    score_regs = m["BL"] * m["BN"] / (32 * 8)
    out = [c for c in pool_space(L, N, D, dtype)
           if c["num_warps"] == 8
           and max(m["BVD"], m["BVO"]) * m["BM"] / (32 * c["num_warps"]) <= 64
           and c["BD"] * c["num_stages"] <= (64 if score_regs >= 64 else 128)
           and _fits(smem_fused(m, c, dtype), c["num_warps"])]
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


# ----------------------------------------------------------------------------- backward token
def _bwd_one_tile(BL: int, BN: int, dtype: torch.dtype) -> bool:
    one_max = 256 if _half(dtype) else 32  # fp32: true-fp32 dots keep their operands in registers
    lim = device_limits()
    if lim is not None and lim.arch >= 100 and lim.arch < 120:
        one_max = min(one_max, 128)  # sm_100: ptxas spilled 208-216 bytes at BN = 256 (vit_b16, Triton 3.8)
    if BN * BL > 64 * one_max:  # the s and gp blocks [BL, BN] (fp32) must fit the registers (8 warps)
        return False
    smallest = dict(BD=16, num_warps=8, num_stages=1)
    return smem_bwd(dict(BL=BL, BN=BN, ONE_TILE=True), smallest, dtype) <= smem_budget()


def bwd_meta(L: int, N: int, D: int, dtype: torch.dtype) -> Dict:
    BN, BL = _p2(N), _p2(L)
    one = _bwd_one_tile(BL, BN, dtype)
    return dict(BL=BL, BN=BN if one else (32 if BL <= 64 else 16), ONE_TILE=one)


def bwd_space(L: int, N: int, D: int, dtype: torch.dtype) -> List[Dict]:
    m = bwd_meta(L, N, D, dtype)
    BL, BN = m["BL"], m["BN"]
    out = []
    # one stage: triton 3.6 fails to pipeline this persistent kernel at 2
    # the long path re-reads its p/gp scratch once per feature tile: widest tile first there
    bds = ((32, 64, 16) if m["ONE_TILE"] else (64, 32, 16)) if _half(dtype) else (32, 16)  # 128: 8 bytes spilled
    for bd, w, st in itertools.product(bds, (8,), (1,)):
        if bd > max(16, _p2(D)):
            continue
        # s and gp tiles (fp32) plus the dx tile [BN, BD] and the dq tile [BL, BD], per thread;
        # thresholds calibrated with ptxas -v at vit_b16 (8 warps: BD 32 spill-free at 1 stage only; 4 warps spill, 16 warps cap registers at 128)
        regs = (2 * BL * BN + BN * bd + BL * bd) / (32 * w)
        if regs > (170 if st == 1 else 104):
            continue
        if BL > 64 and bd > 32:  # all 128 slots: ptxas spilled the wider feature tiles
            continue
        cfg = dict(BD=bd, num_warps=w, num_stages=st)
        if _fits(smem_bwd(m, cfg, dtype), w):
            out.append(cfg)
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


# ----------------------------------------------------------------------------- backward slot / finish
def slot_meta(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    return dict(BVD=_p2(VD), BV=_p2(V))


def slot_space(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> List[Dict]:
    m = slot_meta(M, D, VD, V, dtype)
    out = []
    for bm, bd, w, st in itertools.product((64, 128, 32), (64, 128, 32), (8, 4), (2, 1)):
        if bm > max(16, _p2(M)) * 2 or bd > max(16, _p2(D)) or (st == 1 and (bm, bd) != (64, 32)):
            continue
        if _half(dtype) and bm < 64 and M >= 64:  # wgmma needs 64-row tiles
            continue
        if not _half(dtype) and (bd > 32 or bm > 64):
            continue
        # go [BM, BVD], gxp [BM, BD], dW_V [BVD, BD], dW_O [BV, BVD] (fp32) per thread
        # (thresholds calibrated with ptxas -v: 128 spilled at vit_b16 with 4 warps; true-fp32 dots
        # hold their operands in registers too)
        regs = (bm * m["BVD"] + bm * bd + m["BVD"] * bd + m["BV"] * m["BVD"]) / (32 * w)
        if regs > (64 if _half(dtype) else 32):
            continue
        cfg = dict(BM=bm, BD=bd, num_warps=w, num_stages=st)
        if _fits(smem_slot(m, cfg, dtype), w):
            out.append(cfg)
    # fallbacks (float32 at the benchmark shapes): one stage spilled on sm_80, two did not
    return out or [dict(BM=16, BD=16, num_warps=8, num_stages=1), dict(BM=16, BD=16, num_warps=8, num_stages=2)]


def finish_meta(S: int, A: int, H: int, VD: int, V: int) -> Dict:
    return dict(BS=_p2(S), BA=_p2(A), BH=_p2(H, lo=2), BVD=_p2(VD, lo=2))


def finish_space(S: int, A: int, D: int) -> List[Dict]:
    """Weight-sized work (a few hundred kB of weights, P x L x D fp32 partials): one config, not
    tuned. Grid (Hh, cdiv(D, BD)); BP partials per [BP, BSR, BD] load (BSR = next_pow2(S), not
    padded to the 16 rows of the dots), about 32 fp32 registers per thread, so many loads are
    in flight at once (vit_b16, S = 1: 128 partials per load)."""
    bd = max(16, min(32, _p2(D)))
    bsr = _p2(S, lo=1)
    return [dict(BD=bd, BSR=bsr, BP=max(1, 4096 // (bsr * bd)), num_warps=8 if _p2(A) * _p2(S) > 1024 else 4,
                 num_stages=1)]


def bwd_fused_meta(L: int, N: int, D: int, S: int, A: int, H: int, VD: int, V: int, B: int,
                   dtype: torch.dtype) -> Dict:
    """The token kernel's meta-parameters, the finish stage's (its one config's tiles, the
    feature tile renamed ``BDF``) and the slot stage's (the first config of its own space:
    ``BMS``, ``BDS``); the launch's warps and stages are the token stage's, the heaviest."""
    f, _, _ = split(finish_space(S, A, D)[0])
    sm = slot_meta(B * S, D, VD, V, dtype)
    sc = slot_space(B * S, D, VD, V, dtype)[0]
    return dict(bwd_meta(L, N, D, dtype), BDF=f["BD"], BP=f["BP"], BSR=f["BSR"], **finish_meta(S, A, H, VD, V),
                BMS=sc["BM"], BDS=sc["BD"], BVDS=sm["BVD"], BVS=sm["BV"], BMG=gxp_rows(B * S, dtype))


def gxp_rows(M: int, dtype: torch.dtype) -> int:
    """The gxp item's row block: a round's rows (P x S, P up to the SM count) in one block where
    the registers allow (a second block re-reads W_V[h]); 128 rows in half precision cover P <= 128
    at S = 1, as the slot stage's own 128-row tiles do; float32 keeps the slot stage's 64."""
    return min(128 if _half(dtype) else 64, max(16, _p2(M)))


def smem_bwd_fused(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    """One program runs one stage at a time: the largest of the three allocations."""
    slot = dict(BM=meta["BMS"], BD=meta["BDS"], num_stages=cfg["num_stages"])
    sm = dict(BVD=meta["BVDS"], BV=meta["BVS"])
    return max(smem_bwd(meta, cfg, dtype), smem_finish(meta, dict(BD=meta["BDF"]), dtype),
               smem_slot(sm, slot, dtype), smem_gxp(meta, cfg, dtype))


def smem_gxp(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    """The gxp item: g, W_O and go ([BMG, BVS], [BVS, BVDS], [BMG, BVDS]) held across its
    feature tiles, W_V tiles [BVDS, BDS] pipelined, go's fp32 product converted once."""
    BM, BD, BVD, BV = meta["BMG"], meta["BDS"], meta["BVDS"], meta["BVS"]
    return (BM * (BV + BVD) + BV * BVD + max(2, cfg["num_stages"]) * BVD * BD) * _esize(dtype) + BM * BVD * 4


def bwd_fused_space(L: int, N: int, D: int, S: int, A: int, H: int, VD: int, V: int, B: int,
                    dtype: torch.dtype) -> List[Dict]:
    m = bwd_fused_meta(L, N, D, S, A, H, VD, V, B, dtype)
    # BD 64: with the slot and finish stages in the kernel, ptxas spilled 4-16 bytes at vit_l14
    # (sm_80, 90, 120) and 72 at vit_b32 (sm_100; Triton 3.8)
    out = [c for c in bwd_space(L, N, D, dtype)
           if c["BD"] < 64 and _fits(smem_bwd_fused(m, c, dtype), c["num_warps"])]
    if not m["ONE_TILE"] and any(c["BD"] > 16 for c in out):
        # the tiled path's 16-wide feature tile: ptxas capped it at 128 registers and spilled 136
        # bytes on sm_100 (vit_b16, fp16, Triton 3.8); the wider tiles re-read the scratch less anyway
        out = [c for c in out if c["BD"] > 16]
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


def smem_infer(meta: Dict, cfg: Dict, dtype: torch.dtype) -> int:
    """The inference kernel runs a pool item (always the one-tile pooling) or a projection item
    at a time: the larger (its projection tile: ``ROWS`` ring rows, the pool's feature tile)."""
    proj = dict(BM=meta["ROWS"], BD=cfg["BD"], num_stages=cfg["num_stages"])
    return max(smem_pool(dict(meta, ONE_TILE=True), cfg, dtype), smem_proj(meta, proj, dtype))


# ----------------------------------------------------------------------------- persistent program counts
#: The persistent launches' program counts (the backward's token owners, the fused forward's
#: programs) as a percentage of one per SM. Each program keeps a sample in L2 while it works on
#: it: the backward's owner its x (re-read by the second sweep), its gxp rows, its fp32 dqt
#: partial and the tiled path's scratch; the forward's pool its x and the tiled path's scores.
#: 132 owners hold about 79 MB at vit_b16 against an H100's 50 MB, 132 forward programs 78 MB at
#: vit_l14, and the L2 model counts far fewer DRAM bytes with a share of them (bench/NOTES.md), at
#: the price of idle SMs, which only timing can weigh: the op times these on the GPU. Untimed
#: (the interpreter, fixed configs, tracing) it takes ``default_owners``.
OWNER_PCTS = (100, 67, 50, 33, 25)
#: Share of the L2 the samples in flight may fill in ``default_owners`` (the rest: the weights,
#: qt, the gxp rows of the next round, dx or xp on their way out).
OWNER_L2_SHARE = 0.8


def owner_space() -> List[Dict]:
    """The program-count choices, as configs of the pseudo-kernels ``bwd_owners`` and
    ``fwd_programs`` for ``choose``."""
    return [dict(pct=p) for p in OWNER_PCTS]


def owners(programs: int, cfg: Dict) -> int:
    """Programs (token owners) for a choice of ``owner_space`` and the default program count."""
    return max(1, -(-programs * cfg["pct"] // 100))


def default_owners(programs: int, per_owner: int, l2: Optional[int] = None) -> int:
    """The program count taken without timing: the largest choice of ``owner_space`` whose
    samples in flight (``per_owner`` bytes each) fit ``OWNER_L2_SHARE`` of the L2 (``l2``, default: the
    device's, else an H100's), else the smallest."""
    if l2 is None:
        lim = device_limits()
        l2 = lim.l2 if lim is not None else DeviceLimits.l2
    counts = [owners(programs, c) for c in owner_space()]
    return next((n for n in counts if n * per_owner <= OWNER_L2_SHARE * l2), counts[-1])


#: kernel name -> its shared-memory estimate (the spaces above and aot_check's checks)
SMEM_ESTIMATES: Dict[str, Callable[[Dict, Dict, torch.dtype], int]] = {
    "_fwd_fused_kernel": smem_fused, "_bwd_fused_kernel": smem_bwd_fused, "_absorb_kernel": smem_absorb,
    "_infer_kernel": smem_infer,
}
#: the split kernels (the pool, projection, token and finish stages launched one by one): the
#: fused kernels' peers in the tests, not launched by the ops
SMEM_SPLIT: Dict[str, Callable[[Dict, Dict, torch.dtype], int]] = {
    "_fwd_pool_kernel": smem_pool, "_fwd_proj_kernel": smem_proj, "_bwd_slot_kernel": smem_slot,
    "_bwd_token_kernel": smem_bwd, "_bwd_finish_kernel": smem_finish,
}


# ----------------------------------------------------------------------------- configs
def split(cfg: Dict) -> Tuple[Dict, int, int]:
    """A config dict -> (kernel meta-parameters, num_warps, num_stages)."""
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(kernel))


def _canon(name: str) -> str:
    """``bwd_token``, ``_bwd_token`` and ``_bwd_token_kernel`` all name ``_bwd_token_kernel``."""
    name = name.strip()
    return "_" + name.lstrip("_").removesuffix("_kernel") + "_kernel"


_PINS: Dict[str, Dict] = {}


def pin(kernel: str, **cfg) -> None:
    """Use ``cfg`` (all its meta-parameters plus ``num_warps`` and ``num_stages``) for every
    launch of ``kernel`` in this process: no tuning. ``pin(kernel)`` with no config unpins."""
    if not cfg:
        _PINS.pop(_canon(kernel), None)
        return
    if "num_warps" not in cfg or "num_stages" not in cfg:
        raise ValueError(f"pin({kernel!r}): a config needs num_warps and num_stages, got {sorted(cfg)}")
    _PINS[_canon(kernel)] = {k: int(v) for k, v in cfg.items()}


def parse_config_env(text: str) -> Dict[str, Dict]:
    """``"bwd_token:BD=16,num_warps=8,num_stages=1;fwd_pool:..."`` -> {kernel: config}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, body = part.partition(":")
        try:
            cfg = {k.strip(): int(v) for k, v in (kv.split("=") for kv in body.split(",") if kv.strip())}
        except ValueError:
            cfg = {}
        if not sep or "num_warps" not in cfg or "num_stages" not in cfg:
            raise ValueError(f"SPARO_FAST_CONFIG: cannot read {part!r}; expected "
                             "'kernel:BD=16,num_warps=8,num_stages=1' entries separated by ';'")
        out[_canon(name)] = cfg
    return out


def pinned(kernel: str) -> Optional[Dict]:
    name = _canon(kernel)
    if name in _PINS:
        return dict(_PINS[name])
    env = parse_config_env(os.environ.get("SPARO_FAST_CONFIG", ""))
    return env.get(name)


# ----------------------------------------------------------------------------- keys and caches
def tune_key(kernel, named: Dict, key: List[str], tag: Tuple) -> str:
    """The cache key of one launch: kernel, the op's tag (N bucket, D, L, dtype, flags) and the
    runtime key arguments, N and M bucketed (exact N and the batch size never enter)."""
    bucket = {"N": n_bucket, "M": m_bucket}
    vals = [f"{k}={bucket.get(k, int)(named[k])}" for k in key if k in named and k not in ("B",)]
    return "|".join([kernel_name(kernel), *map(str, tag), *vals])


def _versions() -> str:
    try:
        from importlib.metadata import version
        pkg = version("sparo-fast")
    except Exception:  # not installed (a source checkout on the path)
        pkg = "src"
    return f"triton{triton.__version__}-torch{torch.__version__.split('+')[0]}-sparo{pkg}"


def cache_path() -> Path:
    """The on-disk choices of this device and these versions of Triton, torch and sparo-fast."""
    base = Path(os.environ.get("SPARO_FAST_CACHE_DIR", Path.home() / ".cache" / "sparo-fast")) / "autotune"
    lim = device_limits()
    dev = "".join(c if c.isalnum() else "-" for c in (lim.name if lim else "cpu"))
    return base / f"{dev}-{_versions()}.json"


_CHOSEN: Dict[str, Dict] = {}
_LOCK = threading.Lock()


def _disk_load() -> Dict[str, Dict]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _disk_store(key: str, cfg: Dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_disk_load(), key: cfg}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)  # atomic: ranks sharing the folder never read half a file
    except OSError:  # a read-only home: the choice stays in this process
        pass


def _store():
    """The default process group's key-value store, when torch.distributed runs several ranks."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _publish(key: str, cfg: Dict, store) -> Dict:
    """First writer wins: every rank ends up with the same (stored) config, without waiting."""
    if store is None:
        return cfg
    won = store.compare_set("sparo_fast/autotune/" + key, "", json.dumps(cfg, sort_keys=True))
    return json.loads(won)


def _published(key: str, store) -> Optional[Dict]:
    k = "sparo_fast/autotune/" + key
    if store is None or not store.check([k]):
        return None
    return json.loads(store.get(k))


# ----------------------------------------------------------------------------- choosing
def choose(kernel: str, key: str, space: List[Dict], bench: Optional[Callable[[Dict], float]]) -> Optional[Dict]:
    """The config for one launch key (order in the module docstring); ``bench(cfg)`` times one
    config (``None``: nothing can be timed, e.g. while tracing). ``None`` when no config is known
    and none can be timed."""
    cfg = pinned(kernel)
    if cfg is not None:
        return cfg
    with _LOCK:
        if key in _CHOSEN:
            return _CHOSEN[key]
        store = _store()
        cfg = _published(key, store) or _disk_load().get(key)
        if cfg is None and len(space) == 1:
            cfg = space[0]
        if cfg is None:
            if bench is None:
                return None
            cfg = _fastest(space, [bench(c) for c in space])
        cfg = _publish(key, cfg, store)
        _CHOSEN[key] = cfg
        if len(space) > 1:
            _disk_store(key, cfg)
        return cfg


def _fastest(space: List[Dict], results: List) -> Dict:
    """``results[i]``: config i's time, or (spilled, time) from ``_bench_fn``: the fastest
    spill-free config, or the fastest of all when every one spilled."""
    ranked = [r if isinstance(r, tuple) else (False, r) for r in results]
    return space[min(range(len(space)), key=lambda i: (bool(ranked[i][0]), ranked[i][1]))]


def chosen() -> Dict[str, Dict]:
    """Every config chosen in this process, by key (the GPU report attaches it)."""
    return dict(_CHOSEN)


def forget() -> None:
    """Drop this process's choices (the disk cache stays): the unit tests' reset."""
    _CHOSEN.clear()


def _tracing(args) -> bool:
    """Fake or functional tensors (torch.compile tracing the op): nothing can be timed."""
    plain = (torch.Tensor, torch.nn.Parameter)
    return any(isinstance(a, torch.Tensor) and type(a) not in plain for a in args) or torch.compiler.is_compiling()


def _bench_fn(kernel, grid, args, meta):
    from triton.testing import do_bench

    named = dict(zip(kernel.arg_names, args))
    reset = [named[r] for r in RESET_ARGS.get(kernel_name(kernel), ())]

    def run(g, c, w, st):
        for t in reset:  # work counters: every run starts from zero
            t.zero_()
        return kernel[g](*args, **meta, **c, num_warps=w, num_stages=st)

    def bench(cfg):
        c, w, st = split(cfg)
        g = grid({**meta, **c}) if callable(grid) else grid
        compiled = run(g, c, w, st)  # compiles, and loads the binary: n_spills is known after it
        ms = do_bench(lambda: run(g, c, w, st))
        for t in reset:  # the real launch after tuning starts from zero too
            t.zero_()
        return (getattr(compiled, "n_spills", 0) or 0) > 0, ms
    return bench


#: kernel -> its work-counter arguments (zero-filled by the op before each launch; each timing
#: run while tuning zeroes them again, or the next run would find every ticket taken)
RESET_ARGS: Dict[str, Tuple[str, ...]] = {"_fwd_fused_kernel": ("SYNC",), "_bwd_fused_kernel": ("SYNC",)}


def launch(kernel, grid, args, meta: Dict, space: List[Dict], key: List[str], tag: Tuple) -> None:
    """Launch ``kernel`` (a ``triton.jit`` function) with the chosen config of ``space``."""
    from torch.library import wrap_triton

    reset = RESET_ARGS.get(kernel_name(kernel), ())
    named = dict(zip(kernel.arg_names, args))
    k = tune_key(kernel, named, key, tag)
    tracing = _tracing(args)
    bench = None if tracing else _bench_fn(kernel, grid, args, meta)
    cfg = choose(kernel_name(kernel), k, space, bench)
    if cfg is None:  # traced by torch.compile with an unknown key: Inductor tunes the pruned space
        wrap_triton(tuned(kernel, space, k, reset=reset))[grid](*args, **meta)
        return
    c, w, st = split(cfg)
    g = grid({**meta, **c}) if callable(grid) else grid
    wrap_triton(kernel)[g](*args, **meta, **c, num_warps=w, num_stages=st)


_TUNED: Dict[Tuple, object] = {}


def tuned(kernel, space: List[Dict], key, tag=(), reset: Tuple[str, ...] = ()):
    """``triton.autotune`` over ``space``, one Autotuner per launch key (no runtime key: the key
    is already bucketed); Triton's own result cache where the installed Triton has one."""
    k = (kernel_name(kernel), str(key)) + tuple(map(str, tag))
    if k not in _TUNED:
        import inspect

        configs = [triton.Config(m, num_warps=w, num_stages=st) for m, w, st in map(split, space)]
        extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        if reset:
            extra["reset_to_zero"] = list(reset)
        _TUNED[k] = triton.autotune(configs=configs, key=[], **extra)(kernel)
    return _TUNED[k]
