"""Traffic accounting of the SPARO read-out on the CPU: counted, not timed.

    python bench/traffic.py --label v1 [--backends triton,torch,reference] [--shapes vit_b16,...] [--l2 50MB,40MB]

For each benchmark shape (docs/DESIGN.md, "Benchmark shapes"), backend and pass (``fwd`` under ``no_grad``; ``fwd_bwd``: the
forward plus ``autograd.grad`` of y, random dy, with respect to x and every parameter; ``infer``, only on request with
``--passes infer``: ``fwd`` with the module in ``eval()``, its caches warmed by an uncounted call; the triton
kernel's ring of pooled rows stops growing at 96 samples, so it is fitted past that, at ``INFER_BATCHES``), the
read-out (float16, L = 64, A = Vd = V = 64, shared k/v, ``need_weights=False``, input checks
off, as in ``bench/RESULTS.md``) runs under ``TRITON_INTERPRET=1`` with two recorders:

* every Triton launch (``kernels/testing/interpreter_trace.Recorder``): **requested** bytes (every
  unmasked load/store lane), **distinct** bytes (the union of the byte ranges the launch
  touches), ``tl.dot`` FLOPs and the launch grid (``grid``: recorded, not fitted; a
  ceil-divided grid is not linear in the batch, ``bench/latency_model.py`` computes it);
* every PyTorch op outside the kernels (a ``TorchDispatchMode``; the ``sparo_fast::*`` custom
  ops are entered, so the PyTorch ops inside them count and their own inputs/outputs do
  not): the distinct bytes of its tensor inputs and outputs, matmul FLOPs. Views and
  allocations move nothing and are not counted; every other op is one launch.

Nothing depends on the kernels' op schemas. Every count is linear in the batch for these
kernels: it is fitted per launch on two small batches, checked at a third, and evaluated at
the benchmark batch. Results: ``bench/results/traffic-<label>.json``; ``python bench/render.py``
renders them into ``bench/RESULTS.md`` (the section built by ``bench/traffic_render.py``).

**DRAM-level** bytes = distinct bytes of each launch + the PyTorch ops' bytes: what HBM serves
if each launch reads its data once and nothing stays in L2 between launches. **Requested**
bytes = every kernel load and store + the PyTorch ops' bytes: what the kernels ask of L2.

**DRAM under an L2 model** (``--l2 50MB,40MB``; ``bench/l2_stream.py``): the pass once more at
the benchmark batch itself, its launches' per-program access streams (a few programs
interpreted, the rest translated) interleaved as resident waves, through a cold LRU cache of
each size; ``python bench/traffic.py --label v3 --backends triton --l2 50MB,40MB`` counts a
checkout. Passes: ``fwd`` (no_grad), ``fwd_train`` (with grad, no backward), ``fwd_bwd``.

The H100 model is a *prediction*, not a timing: per launch
``max(DRAM-level / 3.0 TB/s, requested / 7 TB/s, FLOPs / 600 TFLOP/s) + 2 us`` (launches are
dependent), against a floor time of floor bytes / 3.0 TB/s.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import l2_cache  # noqa: E402
import l2_stream  # noqa: E402
import sparo_readout_bench as sb  # noqa: E402
from sparo_fast.readout import SparoReadout  # noqa: E402
from sparo_fast_kernels import sparo_readout_infer as inf  # noqa: E402
from sparo_fast_kernels.testing import interpreter_trace as trace  # noqa: E402

BACKENDS = ("triton", "torch", "reference")
#: fwd: under no_grad (inference); fwd_train: with grad, as in training, no backward; fwd_bwd: both
PASSES = ("fwd", "fwd_train", "fwd_bwd")
FIT_BATCHES = (2, 4)
CHECK_BATCH = 6
#: the inference kernel's ring of pooled rows stops growing at 96 samples: its counts are linear
#: in the batch past that
INFER_BATCHES, INFER_CHECK = (128, 160), 192
#: kernels whose programs take work items from a ticket counter: the L2 count records them whole
#: and schedules their items on the resident programs in ticket order, each after what it waits for
TICKETED = {"_infer_kernel": l2_stream.st.Tickets("SYNC", inf.SYNC_TICKET, inf.SYNC_ERROR)}
#: persistent kernels the interpreter runs one program per work item, in work order
#: (``sparo_readout_op.INTERPRETER_TICKETS`` off): each item starts after the earlier items
#: whose stores it loads, as their ready flags and done counters make it on a GPU
ITEM_KERNELS = ("_fwd_fused_kernel", "_bwd_fused_kernel")
DTYPE = torch.float16
#: H100 model assumptions (SXM, bf16/fp16 dense): all written beside the predictions.
H100 = {"hbm_Bps": 3.0e12, "l2_Bps": 7.0e12, "flops": 600e12, "launch_s": 2e-6, "sms": 132, "l2": 50_000_000}

_ZERO_BYTE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_",
                  "lift_fresh", "_local_scalar_dense", "_unsafe_view", "clone_if_view", "sym_size", "sym_stride", "sym_numel", "is_same_size"}
_WRITE_ONLY = {"copy_", "fill_", "zero_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
               "new_zeros", "new_ones", "new_full"}
_MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of a view (broadcast dimensions, stride 0, counted once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return (n if t.numel() else 0) * t.element_size()


def _matmul_flops(name: str, args, out) -> int:
    if name not in _MATMULS or not isinstance(out, torch.Tensor):
        return 0
    a = args[1] if name in ("addmm", "baddbmm", "addbmm") else args[0]
    return 2 * out.numel() * a.shape[-1] if name != "addbmm" else 2 * a.numel() * out.shape[-1]


class TorchOpCounter(TorchDispatchMode):
    """Counts the PyTorch ops around the kernels (see the module docstring)."""

    def __init__(self, trace, events: list, space=None) -> None:
        super().__init__()
        self.trace = trace
        self.events = events
        self.space = space  # an access_stream.AddressSpace: also record each op's line stream

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sparo_fast":
            # run the op's CPU kernel with this mode back on: the ops inside it are counted,
            # its own inputs and outputs are not (the kernels' loads and stores are)
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        if not self.trace.in_launch():
            # composite ops (matmul, einsum, ...): count the ops they decompose into
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if self.trace.in_launch():
            return out  # the interpreter's host copies of a launch's arguments
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in _ZERO_BYTE_OPS or name.startswith("empty"):
            return out
        written = {id(a) for i, a in enumerate(args)
                   if i < len(func._schema.arguments) and func._schema.arguments[i].alias_info is not None
                   and func._schema.arguments[i].alias_info.is_write}
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if name in _WRITE_ONLY:
            ins = [a for a in ins if id(a) not in written]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        nbytes = sum(tensor_bytes(t) for t in ins) + sum(tensor_bytes(t) for t in outs)
        if nbytes == 0:
            return out  # e.g. zeros((0,)): no launch
        self.events.append({"name": f"aten.{name}", "kind": "torch", "requested": nbytes, "dram": nbytes,
                            "load": sum(tensor_bytes(t) for t in ins), "store": sum(tensor_bytes(t) for t in outs),
                            "distinct_load": sum(tensor_bytes(t) for t in ins),
                            "distinct_store": sum(tensor_bytes(t) for t in outs),
                            "flops": _matmul_flops(name, args, out), "programs": 0})
        if self.space is not None:
            self.events[-1]["stream"] = l2_stream.op_lines(self.space, ins, outs, f"aten.{name}")
        return out


class _KernelEvents:
    """Interpreter listener that appends each finished launch to the shared event list."""

    def __init__(self, trace, events: list) -> None:
        self.rec = trace.Recorder()
        self.events = events

    def __getattr__(self, item):
        return getattr(self.rec, item)

    def launch_end(self, launch) -> None:
        self.rec.launch_end(launch)
        r = self.rec.launches[-1]
        self.events.append({"name": r.kernel, "kind": "kernel", "requested": r.requested_bytes,
                            "dram": r.distinct_bytes, "load": r.load_bytes, "store": r.store_bytes,
                            "distinct_load": r.distinct_load_bytes, "distinct_store": r.distinct_store_bytes,
                            "flops": r.flops, "programs": r.programs, "grid": list(r.grid)})


def _module(shape: sb.Shape, backend: str):
    m = SparoReadout(shape.D, sb.L_SLOTS, sb.OUT_DIM, sb.ATTN_DIM, sb.VALUE_DIM, sb.NUM_HEADS, sb.SHARE_KV,
                     backend=backend, need_weights=False, dtype=DTYPE)
    m.check_inputs = False
    return m


def _programs_knob():
    """The kernels' knob for the number of persistent programs, if they have one.

    A persistent kernel's counts depend on the batch B and on its program count P (per-program
    partials, per-program loads); on the GPU P = min(B, SMs), on the CPU the kernels pick a small
    P. When the knob exists the counts are fitted as ``a + b*B + c*P`` and evaluated at the
    H100's P, otherwise as ``a + b*B``.
    """
    try:
        from sparo_fast_kernels import sparo_readout_bwd as sparo_bwd
    except Exception:  # pragma: no cover - kernels not importable
        return None
    return sparo_bwd if hasattr(sparo_bwd, "PROGRAMS_OVERRIDE") else None


def count(shape: sb.Shape, backend: str, pass_: str, batch: int, programs: Optional[int] = None,
          seed: int = 0, **stream) -> List[dict]:
    """The launches (kernels and PyTorch ops, in order) of one call at ``batch`` (and ``programs``);
    ``stream``: ``space`` and ``extra`` of :func:`_count`."""
    knob = _programs_knob()
    saved = knob.PROGRAMS_OVERRIDE if knob is not None else None
    if knob is not None:
        knob.PROGRAMS_OVERRIDE = programs
    try:
        return _count(trace, shape, backend, pass_, batch, seed, **stream)
    finally:
        if knob is not None:
            knob.PROGRAMS_OVERRIDE = saved


def _count(trace, shape: sb.Shape, backend: str, pass_: str, batch: int, seed: int, space=None,
           extra=contextlib.nullcontext) -> List[dict]:
    """The pass's launches; with ``space``, the PyTorch ops' line streams too, and ``extra()``
    (a context manager: the access-stream recorder) around the call."""
    torch.manual_seed(seed)
    m = _module(shape, backend)
    x = torch.randn(batch, shape.N, shape.D, dtype=DTYPE)
    # every token valid (the floor reads all of x): the kernels skip tokens past EOS, so random
    # EOS positions would make the counts data-dependent and not linear in the batch
    eos = torch.full((batch,), shape.N - 1) if shape.eos else None
    events: list = []
    if pass_ in ("fwd", "fwd_train", "infer"):  # infer: the module in eval() mode (its inference path)
        m.train(pass_ != "infer")
        if pass_ == "infer":
            with torch.no_grad():
                m(x[:1], None if eos is None else eos[:1])  # warm the absorbed-query cache, uncounted
        x.requires_grad_(pass_ == "fwd_train")
        with torch.set_grad_enabled(pass_ == "fwd_train"), extra(), trace.listening(_KernelEvents(trace, events)), \
                TorchOpCounter(trace, events, space):
            m(x, eos)
        return events
    x.requires_grad_(True)
    params = [x] + list(m.parameters())
    dy = torch.randn(batch, sb.L_SLOTS, sb.OUT_DIM, dtype=DTYPE)
    with extra(), trace.listening(_KernelEvents(trace, events)), TorchOpCounter(trace, events, space):
        y, _ = m(x, eos)
        torch.autograd.grad(y, params, dy)
    return events


_FIELDS = ("requested", "dram", "load", "store", "distinct_load", "distinct_store", "flops", "programs")


def fit(points: List[tuple], runs: List[List[dict]]) -> List[dict]:
    """Per-launch exact fits of every counted field, linear in the variables of ``points``.

    ``points``: one tuple of variables per run, e.g. ``(B,)`` or ``(B, P)``; a constant term is
    added; there must be exactly one run more than variables.
    """
    names = [[e["name"] for e in r] for r in runs]
    if any(n != names[0] for n in names):
        raise RuntimeError(f"the launch sequence changes with the batch ({list(zip(points, names))}): "
                           "no per-launch linear fit")
    design = torch.tensor([[1.0, *p] for p in points], dtype=torch.float64)
    fits = []
    for i, first in enumerate(runs[0]):
        f = {"name": first["name"], "kind": first["kind"]}
        for k in _FIELDS:
            y = torch.tensor([float(r[i][k]) for r in runs], dtype=torch.float64)
            f[k] = torch.linalg.solve(design, y).tolist()
        fits.append(f)
    return fits


def evaluate(fits: List[dict], point: tuple) -> List[dict]:
    return [{"name": f["name"], "kind": f["kind"],
             **{k: int(round(f[k][0] + sum(c * v for c, v in zip(f[k][1:], point)))) for k in _FIELDS}}
            for f in fits]


def predict_s(e: dict) -> float:
    """H100 model (a prediction): one dependent launch."""
    return max(e["dram"] / H100["hbm_Bps"], e["requested"] / H100["l2_Bps"], e["flops"] / H100["flops"]) \
        + H100["launch_s"]


def summarize(launches: List[dict], floor: int) -> dict:
    kern = [e for e in launches if e["kind"] == "kernel"]
    ops = [e for e in launches if e["kind"] == "torch"]
    torch_bytes = sum(e["requested"] for e in ops)
    requested = sum(e["requested"] for e in kern) + torch_bytes
    dram = sum(e["dram"] for e in kern) + torch_bytes
    # variant: a byte a launch both loads and stores (scratch) counts once read and once written
    dram_rw = sum(e["distinct_load"] + e["distinct_store"] for e in kern) + torch_bytes
    pred = sum(predict_s(e) for e in launches)
    floor_s = floor / H100["hbm_Bps"]
    return {"floor_bytes": floor, "kernel_launches": len(kern), "kernel_requested": sum(e["requested"] for e in kern),
            "kernel_distinct": sum(e["dram"] for e in kern), "torch_ops": len(ops), "torch_bytes": torch_bytes,
            "launches": len(launches), "requested": requested, "dram": dram,
            "requested_x": requested / floor, "dram_x": dram / floor,
            "dram_rw": dram_rw, "dram_rw_x": dram_rw / floor, "flops": sum(e["flops"] for e in launches),
            "h100_pred_us": pred * 1e6, "h100_floor_us": floor_s * 1e6, "h100_pred_x": pred / floor_s}


def _plan(batches, check, target: int, knob, programs: int, rounds: bool = False) -> tuple:
    """Fit points, check point and evaluation point: (B,) or, with a program knob, (B, P), and
    with ``rounds`` (the backward: its gxp rows are formed per round of P samples, each round
    reading W_V again) (B, P, R) with R = ceil(B / P), which no sum of B and P terms fits."""
    b1, b2 = batches
    if knob is None:
        return [(b1,), (b2,)], (None if check is None else (check,)), (target,)
    pts = [(b1, b1 // 2), (b2, b2 // 2), (b2, b2)]  # P <= B: every program has samples
    chk, at = (None if check is None else (check, check // 2 + 1)), (target, programs)
    if rounds:
        pts.append((b2 - 1, 1))
        pts, chk, at = ([p + (-(-p[0] // p[1]),) for p in pts], None if chk is None else chk + (-(-chk[0] // chk[1]),),
                        at + (-(-at[0] // at[1]),))
    return pts, chk, at


def eval_programs(shape: sb.Shape, target: int) -> int:
    """The backward's token owners on the H100 model at the benchmark batch, as the op takes them
    untimed (``default_owners``: the largest choice whose samples in flight fit its 50 MB L2)."""
    from sparo_fast_kernels import sparo_readout_autotune as at
    from sparo_fast_kernels import sparo_readout_bwd as bwd

    tiled = not at.bwd_meta(sb.L_SLOTS, shape.N, shape.D, DTYPE)["ONE_TILE"]
    per_owner = bwd.owner_bytes(sb.L_SLOTS, shape.N, shape.D, torch.finfo(DTYPE).bits // 8, tiled)
    return at.default_owners(min(target, H100["sms"]), per_owner, H100["l2"])


def eval_fwd_programs(shape: sb.Shape, batch: int) -> int:
    """The fused forward's persistent programs on the H100 model at ``batch``, as the op takes
    them untimed: the largest share of one per SM whose samples in flight (x, the tiled path's
    scores) fit its 50 MB L2."""
    from sparo_fast_kernels import sparo_readout_autotune as at
    from sparo_fast_kernels import sparo_readout_fwd as fwd

    tiled = not at.pool_meta(sb.L_SLOTS, shape.N, shape.D, DTYPE)["ONE_TILE"]
    per_sample = fwd.sample_bytes(sb.L_SLOTS, shape.N, shape.D, torch.finfo(DTYPE).bits // 8, tiled)
    return at.default_owners(min(batch, H100["sms"]), per_sample, H100["l2"])


def _run(shape, backend, pass_, point) -> List[dict]:
    return count(shape, backend, pass_, point[0], programs=point[1] if len(point) > 1 else None)


def run_case(shape: sb.Shape, backend: str, pass_: str, batches=FIT_BATCHES, check: Optional[int] = CHECK_BATCH,
             target: Optional[int] = None) -> dict:
    target = shape.B if target is None else target
    knob = _programs_knob() if backend == "triton" else None
    points, check_pt, at = _plan(batches, check, target, knob, eval_programs(shape, target), pass_ == "fwd_bwd")
    fits = fit(points, [_run(shape, backend, pass_, p) for p in points])
    launches = evaluate(fits, at)
    for e in launches:
        e["h100_pred_us"] = predict_s(e) * 1e6
    row = {"shape": shape.name, "backend": backend, "pass": pass_, "batch": target, "fit_points": points,
           "eval_point": list(at), "fit_vars": ["B", "P", "R"][:len(at)],
           **summarize(launches, sb.floor_bytes(shape, target, DTYPE, "fwd" if pass_ == "fwd_train" else pass_)), "launch_detail": launches}
    if check_pt is not None:
        measured = _run(shape, backend, pass_, check_pt)
        predicted = evaluate(fits, check_pt)
        worst = 0.0
        for k in ("requested", "dram", "flops"):
            for p, m in zip(predicted, measured):
                worst = max(worst, abs(p[k] - m[k]) / max(m[k], 1))
        if [e["name"] for e in measured] != [e["name"] for e in predicted]:
            worst = math.inf
        row["check_point"], row["check_max_rel_err"] = list(check_pt), worst
    return row


def l2_case(shape: sb.Shape, backend: str, pass_: str, batch: int, programs: Optional[int], sizes: Dict[str, int],
            resident: int = H100["sms"], ways: Optional[int] = None, sample: bool = True,
            full_kernels: tuple = (), waits: bool = True) -> dict:
    """DRAM bytes of one call at ``batch`` under the L2 model, per size (see ``bench/l2_stream.py``)."""
    space = l2_stream.st.AddressSpace()
    rec = l2_stream.st.StreamRecorder(space, sample=sample, full_kernels=full_kernels, ticketed=TICKETED,
                                      item_kernels=ITEM_KERNELS if waits else ())
    events = count(shape, backend, pass_, batch, programs=programs, space=space,
                   extra=lambda: l2_stream.recording(rec))
    # persistent launches with fewer programs than SMs run fewer items at once: the backward one per
    # token owner, the fused forward its share of the SMs
    grids = {"_fwd_fused_kernel": eval_fwd_programs(shape, batch), **({"_bwd_fused_kernel": programs} if programs else {})}
    streams = l2_stream.pass_streams(events, rec, resident, grids)
    out = {"resident": resident, "ways": ways, "sampled": sample, "grids": grids,
           "programs_run": sum(k.recorded for k in rec.launches),
           "programs": sum(len(k.programs) for k in rec.launches),
           "blocks_recorded_whole": sum(k.full_blocks for k in rec.launches),
           "per_kernel": [{"kernel": k.kernel, "grid": list(k.grid), "programs_run": k.recorded, "blocks": k.blocks,
                           "blocks_recorded_whole": k.full_blocks, "items_wait": k.after is not None}
                          for k in rec.launches], "sizes": {}}
    for label, size in sizes.items():
        out["sizes"][label] = {"bytes": size, **l2_stream.simulate(streams, size, ways, space)}
    return out


def add_l2(row: dict, shape: sb.Shape, sizes: Dict[str, int], resident: int, ways: Optional[int],
           full_kernels: tuple = ()) -> None:
    """The L2-model columns of a row: ``l2`` (per size: DRAM bytes, ratio to the floor) and
    ``l2_<size>`` per launch of ``launch_detail``."""
    at = row["eval_point"]
    res = l2_case(shape, row["backend"], row["pass"], at[0], at[1] if len(at) > 1 else None, sizes, resident, ways,
                  full_kernels=full_kernels)
    names = [e["name"] for e in row["launch_detail"]]
    for label, r in res["sizes"].items():
        r["dram_x"] = r["dram"] / row["floor_bytes"]
        per = r.pop("per_launch")
        if len(per) != len(names):
            raise RuntimeError(f"{len(per)} launches in the L2 run, {len(names)} in the count")
        for e, p in zip(row["launch_detail"], per):
            e[f"l2_{label}"] = p["read"] + p["writeback"]
    row["l2"] = res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", required=True, help="writes bench/results/traffic-<label>.json")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--shapes", default=",".join(sb.SHAPES))
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--no-check", action="store_true", help="skip the third-batch check of the fit")
    ap.add_argument("--note", default="", help="a line for the rendered section (e.g. the commit)")
    ap.add_argument("--l2", default="", help="L2 sizes to model, e.g. 50MB,40MB (H100, A100): DRAM bytes "
                    "under an LRU L2 at the benchmark batch beside the other columns")
    ap.add_argument("--l2-resident", type=int, default=H100["sms"], help="programs running at once (default: SMs)")
    ap.add_argument("--l2-ways", type=int, default=None, help="set-associative L2 with this many ways "
                    "(default: fully associative)")
    ap.add_argument("--l2-full", default="", help="kernels to interpret with every program (e.g. ones whose "
                    "programs wait for each other); the others run a few programs, translated to the rest")
    args = ap.parse_args(argv)
    try:
        sizes = {t.strip(): l2_cache.parse_size(t) for t in args.l2.split(",") if t.strip()}
    except ValueError as err:
        ap.error(str(err))
    for what, given, known in (("shape", args.shapes, sb.SHAPES), ("backend", args.backends, BACKENDS),
                               ("pass", args.passes, PASSES + ("infer",))):
        bad = [v for v in given.split(",") if v not in known]
        if bad:
            ap.error(f"unknown {what} {bad[0]!r}: one of {', '.join(known)}")
    rows = []
    for name in args.shapes.split(","):
        for backend in args.backends.split(","):
            for pass_ in args.passes.split(","):
                batches, check = (INFER_BATCHES, INFER_CHECK) if pass_ == "infer" else (FIT_BATCHES, CHECK_BATCH)
                row = run_case(sb.SHAPES[name], backend, pass_, batches, None if args.no_check else check)
                if sizes:
                    add_l2(row, sb.SHAPES[name], sizes, args.l2_resident, args.l2_ways,
                           tuple(k for k in args.l2_full.split(",") if k))
                rows.append(row)
                print(f"{name:8s} {backend:9s} {pass_:8s} requested {row['requested_x']:6.2f}x  "
                      f"DRAM {row['dram_x']:5.2f}x  launches {row['launches']:3d}  "
                      f"H100 model {row['h100_pred_x']:5.2f}x floor  "
                      f"fit check {row.get('check_max_rel_err', float('nan')):.1e}"
                      + "".join(f"  L2 {k} DRAM {v['dram_x']:5.2f}x" for k, v in row.get("l2", {}).get("sizes", {}).items()),
                      flush=True)
                _write(args, rows)
    print(f"wrote {_write(args, rows)}")


def _write(args, rows: List[dict]) -> Path:
    """Write the label's JSON (after every case: a long run keeps what it counted so far)."""
    doc = {"label": args.label, "note": args.note, "dtype": str(DTYPE).replace("torch.", ""),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "triton": sb.triton_version(), "h100_model": H100, "rows": list(rows)}
    out = sb.RESULTS_DIR / f"traffic-{args.label}.json"
    if out.exists():  # keep the cases of an earlier run of the same label that were not re-run
        done = {(r["shape"], r["backend"], r["pass"]) for r in rows}
        old = [r for r in json.loads(out.read_text())["rows"] if (r["shape"], r["backend"], r["pass"]) not in done]
        doc["rows"] = old + doc["rows"]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    main()
