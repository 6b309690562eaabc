"""A latency-aware H100 model of the read-out's launches: a *prediction*, not a timing.

``traffic.predict_s`` sees bytes and FLOPs only: a launch with few programs, or whose programs
walk long chains of dependent loads, is predicted as fast as bandwidth allows. Per launch this
module adds what makes latency visible:

* **grid and waves**: the launch's programs (the grid of ``kernels/sparo_readout_op.py`` at the
  benchmark batch) and waves = ceil(programs / (SMs x resident programs per SM));
* **occupancy**: resident programs per SM from the compile facts of
  ``bench/results/compile-matrix.json`` (Triton 3.8.0, sm_90, float16): registers per thread x
  num_warps x 32 against 65,536 registers, shared memory against 228 kB, at most 64 warps and
  32 programs per SM. On a GPU the kernels autotune; the first config of the space that fits
  (compiles, fits shared memory, spills nothing) stands in for the tuned one;
* **serial chain**: the sequential loop trips one program makes (:data:`KERNELS`, a function of
  the launch's shape and config), at ``TRIP_S`` (about one dependent DRAM round trip, 1 us)
  per trip, divided by num_stages when the loop is software-pipelined (num_stages > 1).

Per launch: ``max(bandwidth time / SM utilisation, waves x chain) + 2 us``, where the bandwidth
time is ``traffic.predict_s`` less its launch overhead and the SM utilisation is the share of
SMs that hold at least one program, averaged over the waves (one resident program per SM is
assumed to draw the SM's share of bandwidth). PyTorch ops keep ``traffic.predict_s``.
It ignores L2 hits, tail effects within a wave, clocks, overlap of launches and of waves, and
how much latency the warps of one program hide.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from sparo_fast_kernels import sparo_readout_autotune as at
from sparo_fast_kernels import sparo_readout_infer as inf

HERE = Path(__file__).resolve().parent
MATRIX = HERE / "results" / "compile-matrix.json"
#: H100 SXM per-SM limits (sm_90) and the per-trip latency assumption
SM = {"sms": 132, "regs": 65536, "smem": 228 * 1024, "warps": 64, "programs": 32}
TRIP_S = 1e-6
LAUNCH_S = 2e-6


class Launch(NamedTuple):
    """Read-out dimensions of one launch: batch, tokens, width, slots, heads, slots per head,
    value dims per head, output dims and the persistent kernels' program counts (the backward's
    token owners, the fused forward's programs)."""
    B: int
    N: int
    D: int
    L: int
    H: int
    S: int
    VD: int
    V: int
    P: int
    A: int = 64
    PF: int = 132


def resident(regs: int, num_warps: int, shared: int) -> int:
    """Programs one SM holds at once (0: the config does not fit an SM)."""
    by_regs = SM["regs"] // max(1, regs * 32 * num_warps)
    by_smem = SM["smem"] // shared if shared else SM["programs"]
    return min(by_regs, by_smem, SM["warps"] // num_warps, SM["programs"])


def waves(programs: int, per_sm: int) -> int:
    return math.ceil(programs / (SM["sms"] * per_sm))


def sm_utilisation(programs: int, per_sm: int) -> float:
    """Share of SMs holding a program, averaged over the waves."""
    slots, n = SM["sms"] * per_sm, waves(programs, per_sm)
    busy = [min(SM["sms"], min(slots, programs - i * slots)) for i in range(n)]
    return sum(busy) / (n * SM["sms"])


def _cd(a: int, b: int) -> int:
    return -(-a // b)


def _pool(s: Launch, c: Dict):
    m = at.pool_meta(s.L, s.N, s.D, torch.float16)
    sweeps = 2 if m["ONE_TILE"] else 2 * _cd(s.N, m["BN"])  # score + pool sweep over D (x N tiles)
    return s.B * _cd(s.L, m["BL"]), sweeps * _cd(s.D, c["BD"]), True


def _proj(s: Launch, c: Dict):
    m = at.proj_meta(s.B * s.S, s.D, s.VD, s.V, torch.float16)
    return _cd(s.B * s.S, c["BM"]) * s.H, _cd(s.D, c["BD"]) + _cd(s.V, m["BVO"]), True  # D sweep, V sweep


def _slot(s: Launch, c: Dict):
    return s.H * _cd(s.D, c["BD"]), 2 * _cd(s.B * s.S, c["BM"]), True  # feature-tile 0 sweeps M twice


def _token(s: Launch, c: Dict):
    m = at.bwd_meta(s.L, s.N, s.D, torch.float16)
    per_sample = 2 if m["ONE_TILE"] else 2 * _cd(s.N, m["BN"])  # score + dx/dq sweep over D (x N tiles)
    return s.P, _cd(s.B, s.P) * per_sample * _cd(s.D, c["BD"]), False  # num_stages = 1: not pipelined


def _finish(s: Launch, c: Dict):
    f = at.finish_space(s.S, s.A, s.D)[0]  # its one config (the matrix row carries no BD)
    programs = s.H * _cd(s.D, f["BD"])
    # the sweep over the P partials, BP at a time, then the NV trips of the dW_O / db_O head sums
    return programs, _cd(s.P, f["BP"]) + _cd(s.V, programs), False


def _fwd_fused(s: Launch, c: Dict):
    """One program per work item (the interpreter's grid; on a GPU persistent programs take the
    items in the same order): the samples' pooling and the row tiles' projections; the chain is
    a pooling item's (the longer)."""
    m = at.fused_meta(s.L, s.N, s.D, s.VD, s.V, torch.float16)
    programs, trips, _ = _pool(s, c)
    return programs // _cd(s.L, m["BL"]) + s.H * _cd(s.B * s.S, m["BM"]), trips, True


def _bwd_fused(s: Launch, c: Dict):
    """One program per work item, as ``_fwd_fused``: per round of P samples its Hh gxp items
    (a head's row blocks over every feature tile) and its P owner items (one sample each), then
    the batch-sum tiles and the finish tiles. Items differ a lot in length (an owner's sample
    against a gxp item's few row blocks): the chain is the items' mean trips, so that waves x
    chain is the work per SM."""
    m = at.bwd_fused_meta(s.L, s.N, s.D, s.S, s.A, s.H, s.VD, s.V, s.B, torch.float16)
    _, trips, _ = _token(s, c)
    rounds, slots = _cd(s.B, s.P), s.H * _cd(s.D, m["BDS"])
    finish = s.H * _cd(s.D, m["BDF"])
    items = rounds * (s.H + s.P) + slots + finish
    work = (rounds * s.P * (trips // rounds) + rounds * slots * _cd(s.P * s.S, m["BMG"])
            + slots * _cd(s.B * s.S, m["BMS"]) + finish * _cd(s.P, m["BP"]))
    return items, _cd(work, items), False


def _absorb(s: Launch, c: Dict):
    """The absorbed query: one program per head and feature tile, a loop over A in BA chunks."""
    c = at.absorb_space(s.S, s.A, s.D)[0]  # its one config
    return s.H * _cd(s.D, c["BD"]), _cd(s.A, c["BA"]), False


def _infer(s: Launch, c: Dict):
    """The inference kernel's work items (every sample's pooling, every chunk's head projections)
    on persistent programs in ticket order, as ``_fwd_fused``; its tiles come from ``infer_meta``
    (fixed, not in the matrix row's config). The chain is a pooling item's (two sweeps over D);
    a projection item (one sweep over D, then the output tiles) counts as that share of one."""
    m = inf.infer_meta(s.L, s.N, s.D, s.S, s.VD, s.V, torch.float16)
    pool_trips = 2 * _cd(s.D, m["BD"])
    proj_trips = _cd(s.D, m["BD"]) + _cd(s.V, m["BVO"])
    return s.B + _cd(_cd(s.B, m["G"]) * s.H * proj_trips, pool_trips), pool_trips, True


#: kernel -> (Launch, config) -> (programs, sequential trips per program, loop pipelined)
KERNELS: Dict[str, Callable] = {"_fwd_pool_kernel": _pool, "_fwd_proj_kernel": _proj, "_bwd_slot_kernel": _slot,
                                "_bwd_token_kernel": _token, "_bwd_finish_kernel": _finish,
                                "_fwd_fused_kernel": _fwd_fused, "_bwd_fused_kernel": _bwd_fused,
                                "_absorb_kernel": _absorb, "_infer_kernel": _infer}


#: Persistent kernels launched with fewer programs than SMs on a GPU (the backward: one per
#: token owner; the fused forward: its share of the SMs), whose items the interpreter's grid
#: lists one per program.
PERSISTENT_GRIDS: Dict[str, Callable] = {"_bwd_fused_kernel": lambda s: s.P, "_fwd_fused_kernel": lambda s: s.PF}


@functools.lru_cache(maxsize=None)
def _matrix_rows(path: Path) -> tuple:
    return tuple(json.loads(path.read_text())["versions"]["3.8.0"]["90"])


def compile_facts(shape: str, kernel: str, dtype: str = "fp16", path: Path = MATRIX) -> Dict:
    """The first fitting config of ``kernel`` at ``shape`` (Triton 3.8.0, sm_90) and its facts."""
    for r in _matrix_rows(path):
        if (r["shape"], r["dtype"], r["kernel"]) == (shape, dtype, kernel) and "error" not in r \
                and r["fits"] and not r["spill_bytes"]:
            return r
    raise KeyError(f"no fitting sm_90 config of {kernel} at {shape}/{dtype} in {path.name}")


def chain_s(trips: int, num_stages: int, pipelined: bool) -> float:
    return max(1, trips) * TRIP_S / (num_stages if pipelined and num_stages > 1 else 1)


def predict(e: Dict, bandwidth_s: float, dims: Launch, facts: Optional[Dict]) -> Dict:
    """The latency-aware prediction of one launch ``e`` (a kernel with ``facts``; else as given)."""
    if facts is None or e["name"] not in KERNELS:
        return {"latency_pred_us": (bandwidth_s + LAUNCH_S) * 1e6}
    cfg = facts["config"]
    programs, trips, pipelined = KERNELS[e["name"]](dims, cfg)
    per_sm = resident(facts["regs"], cfg["num_warps"], facts["shared"])
    n = waves(programs, per_sm)
    util = sm_utilisation(programs, per_sm)
    if e["name"] in PERSISTENT_GRIDS:  # its items run on its grid's programs only, one per SM
        grid = min(PERSISTENT_GRIDS[e["name"]](dims), SM["sms"] * per_sm)
        n, util = math.ceil(programs / grid), min(1.0, grid / SM["sms"])
    chain = n * chain_s(trips, cfg["num_stages"], pipelined)
    t = max(bandwidth_s / util, chain) + LAUNCH_S
    return {"grid_programs": programs, "per_sm": per_sm, "waves": n, "trips": trips, "chain_us": chain * 1e6,
            "sm_util": util, "latency_pred_us": t * 1e6}


def annotate(row: Dict, dims: Launch) -> float:
    """Add the latency columns to every launch of a traffic row; the pass's total in us."""
    total = 0.0
    for e in row["launch_detail"]:
        facts = compile_facts(row["shape"], e["name"]) if e["name"] in KERNELS else None
        bw = e["h100_pred_us"] * 1e-6 - LAUNCH_S
        e.update(predict(e, bw, dims, facts))
        total += e["latency_pred_us"]
    return total


def bench_dims(row: Dict, shapes: Dict) -> Launch:
    """The benchmark read-out's launch dimensions for a traffic row (L = H = 64, one slot per
    head, A = Vd = V = 64, P = the row's program count: the backward's owners, else min(B, SMs);
    PF = the fused forward's programs in the row's L2 run, else min(B, SMs))."""
    sh = shapes[row["shape"]]
    at = row.get("eval_point", [])
    P = at[1] if len(at) > 1 else min(row["batch"], SM["sms"])
    PF = row.get("l2", {}).get("grids", {}).get("_fwd_fused_kernel", min(row["batch"], SM["sms"]))
    return Launch(B=row["batch"], N=sh.N, D=sh.D, L=64, H=64, S=1, VD=1, V=64, P=P, PF=PF)


def summarize(rows: List[Dict], dims_of: Callable[[Dict], Launch]) -> None:
    """``latency_pred_us`` and ``latency_pred_x`` (of the floor time) on every triton row."""
    for r in rows:
        if r["backend"] != "triton":
            continue
        r["latency_pred_us"] = annotate(r, dims_of(r))
        r["latency_pred_x"] = r["latency_pred_us"] / r["h100_floor_us"]
