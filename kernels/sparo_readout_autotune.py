"""Launch configurations of the SPARO kernels: pruned autotuning spaces and their fixed picks.

Each kernel has

* **fixed meta-parameters**, set by the shape and never tuned: the slot block ``BL`` (all
  slots, next power of two), the token tile ``BN`` and the ``ONE_TILE`` path (the whole
  sequence in one register tile when ``next_pow2(N)`` is at most ``one_tile_max``), the value
  blocks of the projection kernel;
* a **space** of ``triton.Config`` (feature tile ``BD`` / row tile ``BM``, ``num_warps``,
  ``num_stages``), pruned in Python from the shape features that matter, **(N bucket, D, L,
  dtype)**: register estimates (an fp32 [BL, BN] tile costs BL*BN/(32*warps) registers per
  thread), shared-memory estimates (stages x the operand tiles, under 200 kB of the H100's
  227 kB) and tiles no wider than the problem. ``triton.autotune`` times the pruned space on
  the user's GPU the first time a key is seen (key: N, D, L and the tensors' dtypes).

Under the Triton CPU interpreter (and for ``aot_check``'s default report) the first config of
the space is used: the most conservative one. No kernel accumulates into memory it did not
write in the same launch (the backward's ``dqt`` partials are stored outright for a program's
first sample), so re-running a config while tuning is harmless: no ``reset_to_zero`` or
``restore_value`` is needed, and none is passed.

``tests/test_sparo_readout_compile.py`` compiles every config of every space for sm_90 and checks
registers, spills and tensor-core instructions (``python -m sparo_fast_kernels.testing.aot_check
--every-config``).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Tuple

import torch
import triton

from .sparo_readout_fwd import _p2

_SMEM = 200 * 1024
_REG_TILE = 64  # fp32 registers per thread one [BL, BN] score-sized tile may take (calibrated with ptxas)


def _half(dtype: torch.dtype) -> bool:
    return dtype != torch.float32


def _esize(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def n_bucket(N: int) -> int:
    """The token-count feature of the keys: next power of two (>= 16)."""
    return _p2(N)


# ----------------------------------------------------------------------------- forward pool
def pool_meta(L: int, N: int, D: int, dtype: torch.dtype) -> Dict:
    one_max = 256 if _half(dtype) else 64  # 16 warps cap registers at 128: no help; fp32 dots need more
    BN, BL = _p2(N), _p2(L)
    one = BN * BL <= 64 * one_max  # the [BL, BN] fp32 score block fits the registers (8 warps)
    return dict(BL=BL, BN=BN if one else (64 if _half(dtype) and BL <= 64 else 32), ONE_TILE=one)


def pool_space(L: int, N: int, D: int, dtype: torch.dtype) -> List[Dict]:
    m = pool_meta(L, N, D, dtype)
    BL, BN = m["BL"], m["BN"]
    # the long path re-reads its score scratch once per feature tile: widest tile first
    bds = ((64, 32, 128) if m["ONE_TILE"] else (128, 64, 32)) if _half(dtype) else (32,)
    out = []
    for bd, w, st in itertools.product(bds, (8, 4), (2, 3)):
        if bd > max(16, _p2(D)):
            continue
        tiles = 1 + (0 if m["ONE_TILE"] else 1)  # the score tile (and the long path's acc tile)
        if BL * BN * tiles / (32 * w) > _REG_TILE or BL * bd / (32 * w) > 64:
            continue
        if not m["ONE_TILE"] and (w < 8 or BL * bd > 8192):  # ptxas spilled these (vit_l14, L = 128)
            continue
        if st * (BN + BL) * bd * _esize(dtype) > _SMEM:
            continue
        out.append(dict(BD=bd, num_warps=w, num_stages=st))
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


# ----------------------------------------------------------------------------- forward proj
def proj_meta(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    return dict(BVD=_p2(VD), BVO=_p2(V, hi=64 if _half(dtype) else 32))


def proj_space(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> List[Dict]:
    m = proj_meta(M, D, VD, V, dtype)
    out = []
    for bm, bd, w in itertools.product((64, 128, 32), (64, 32), (8, 4)):
        if bm > max(16, _p2(M)) * 2 or bd > max(16, _p2(D)):
            continue
        if _half(dtype) and bm < 64 and M >= 64:  # wgmma needs 64-row tiles (32 rows: mma.sync)
            continue
        if bm * m["BVD"] / (32 * w) > 64 or bm * m["BVO"] / (32 * w) > 64:  # o and one y tile in registers
            continue
        if not _half(dtype) and bd > 32:
            continue
        if 3 * (bm + m["BVD"]) * bd * _esize(dtype) > _SMEM:
            continue
        out.append(dict(BM=bm, BD=bd, num_warps=w, num_stages=3))
    return out or [dict(BM=16, BD=16, num_warps=4, num_stages=1)]


# ----------------------------------------------------------------------------- backward token
def bwd_meta(L: int, N: int, D: int, dtype: torch.dtype) -> Dict:
    one_max = 256 if _half(dtype) else 32  # fp32: true-fp32 dots keep their operands in registers
    BN, BL = _p2(N), _p2(L)
    one = BN * BL <= 64 * one_max  # the s and gp blocks [BL, BN] (fp32) fit the registers (8 warps)
    return dict(BL=BL, BN=BN if one else (32 if BL <= 64 else 16), ONE_TILE=one)


def bwd_space(L: int, N: int, D: int, dtype: torch.dtype) -> List[Dict]:
    m = bwd_meta(L, N, D, dtype)
    BL, BN = m["BL"], m["BN"]
    out = []
    # one stage: triton 3.6 (the GPU image's) fails to pipeline this persistent kernel at 2
    # the long path re-reads its p/gp scratch once per feature tile: widest tile first there
    bds = ((32, 64, 16) if m["ONE_TILE"] else (64, 32)) if _half(dtype) else (32,)  # 128: 8 bytes spilled
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
        if st * (BN + 2 * BL) * bd * _esize(dtype) > _SMEM:
            continue
        out.append(dict(BD=bd, num_warps=w, num_stages=st))
    return out or [dict(BD=16, num_warps=8, num_stages=1)]


# ----------------------------------------------------------------------------- backward slot / finish
def slot_meta(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> Dict:
    return dict(BVD=_p2(VD), BV=_p2(V))


def slot_space(M: int, D: int, VD: int, V: int, dtype: torch.dtype) -> List[Dict]:
    m = slot_meta(M, D, VD, V, dtype)
    out = []
    for bm, bd, w in itertools.product((64, 128, 32), (64, 128, 32), (8, 4)):
        if bm > max(16, _p2(M)) * 2 or bd > max(16, _p2(D)):
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
        out.append(dict(BM=bm, BD=bd, num_warps=w, num_stages=2))
    return out or [dict(BM=16, BD=16, num_warps=8, num_stages=1)]


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


# ----------------------------------------------------------------------------- launching
def split(cfg: Dict) -> Tuple[Dict, int, int]:
    """A config dict -> (kernel meta-parameters, num_warps, num_stages)."""
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


_TUNED: Dict[Tuple, object] = {}


def tuned(kernel, space: List[Dict], key: List[str], tag: Tuple):
    """``triton.autotune`` over ``space`` for ``kernel``, one Autotuner per (kernel, shape key)."""
    k = (kernel.__name__ if hasattr(kernel, "__name__") else id(kernel),) + tuple(tag)
    if k not in _TUNED:
        configs = []
        for c in space:
            meta, w, st = split(c)
            configs.append(triton.Config(meta, num_warps=w, num_stages=st))
        _TUNED[k] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNED[k]
