"""Compile the SPARO kernels for any NVIDIA architecture without a GPU: registers, spills, shared
memory, whether each config fits the architecture, and the tensor-core instructions.

``python -m sparo_fast_kernels.testing.aot_check --arch 86 [--json FILE] [--jobs J] [--picked]``

The kernels, their arguments and their spaces are not listed here: the forward and backward
ops (``sparo_readout_op``) run on ``meta`` tensors with their launches intercepted
(``sparo_readout_autotune.launch`` and ``wrap_triton``), so every launch the ops make at a shape
is seen with its real arguments, constexprs and pruned space -- pruned for the architecture's
limits by ``sparo_readout_autotune.assume``, as on a real device. Each config is compiled with
Triton's own ``triton.compile`` for a ``GPUTarget`` and measured with the bundled ``ptxas -v``.
Runtime specialisation is mimicked: pointers and the integers that are multiples of 16 get
``tt.divisibility=16``, integers equal to 1 become constants, as Triton's launcher does.

Distinct compilations (kernel, signature, constexprs, warps, stages, arch) are compiled once,
in ``--jobs`` processes, and their results cached under ``~/.cache/sparo-fast/aot/`` by Triton
version and kernel source (``SPARO_FAST_CACHE_DIR`` moves it). Must run with
``TRITON_INTERPRET`` unset (the interpreter replaces the JIT functions).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
ARCHS = (80, 86, 89, 90, 100, 120)

#: (name, B, N, D, L, H, A = Vd, V): the benchmark shapes, then the test suite's and the extremes
SHAPES = (
    ("vit_b32", 512, 50, 768, 64, 64, 64, 64),
    ("vit_b16", 256, 197, 768, 64, 64, 64, 64),
    ("text_b", 256, 77, 512, 64, 64, 64, 64),
    ("vit_l14", 128, 257, 1024, 64, 64, 64, 64),
    ("tiny", 2, 9, 40, 4, 2, 8, 6),
    ("text_tiny", 3, 77, 100, 8, 4, 16, 24),
    ("slots128", 8, 1030, 1290, 128, 4, 40, 33),
    ("few_slots", 8, 50, 96, 6, 3, 256, 10),
)
BENCH_SHAPES = ("vit_b32", "vit_b16", "text_b", "vit_l14")


@dataclass
class Launch:
    """One kernel launch the ops make: named runtime arguments, constexprs, candidate configs."""
    kernel: object
    named: Dict
    consts: Dict
    space: List[Dict] = field(default_factory=list)


def _shape_tensors(B, N, D, L, H, A, V, dtype, text):
    S = L // H
    dev = "meta"
    t = lambda *s, dt=dtype: torch.empty(s, device=dev, dtype=dt)  # noqa: E731
    return dict(x=t(B, N, D), eos=t(B, dt=torch.int64) if text else None, q_emb=t(1, H, S, 1, A),
                k_weight=t(H * A, D), k_bias=t(H * A), v_weight=t(H * A, D), v_bias=t(H * A),
                proj_weight=t(V, H * A), proj_bias=t(V), grad_out=t(B, L, V))


class _Recorder:
    """Stands for ``wrap_triton(kernel)``: records a direct launch (a fixed config)."""

    def __init__(self, records, kernel):
        self.records, self.kernel = records, kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            cfg = dict(num_warps=kwargs.pop("num_warps", 4), num_stages=kwargs.pop("num_stages", 3))
            self.records.append(Launch(self.kernel, dict(zip(self.kernel.arg_names, args)), kwargs, [cfg]))
        return run


def capture(shape, dtype, limits) -> List[Launch]:
    """Every launch of the forward, backward and inference ops at ``shape`` (an entry of
    ``SHAPES``; the inference kernel where it takes the shape), with the spaces pruned for
    ``limits`` (a ``DeviceLimits``; ``None``: the no-device cap). As in training: the attention
    weights are returned but get no gradient; as in evaluation: the inference kernel returns
    none; text shapes (``text*``) have EOS indices."""
    from .. import sparo_readout_autotune as at
    from .. import sparo_readout_bwd as bwd
    from .. import sparo_readout_common as common
    from .. import sparo_readout_infer as inf
    from .. import sparo_readout_op as op

    name, B, N, D, L, H, A, V = shape
    records: List[Launch] = []

    def fake_launch(kernel, grid, args, meta, space, key, tag):
        records.append(Launch(kernel, dict(zip(kernel.arg_names, args)), dict(meta), list(space)))

    saved = (at.launch, op.wrap_triton, inf.wrap_triton, bwd.PROGRAMS_OVERRIDE, common.DISCARD_OVERRIDE)
    at.launch = fake_launch
    op.wrap_triton = inf.wrap_triton = (lambda k: _Recorder(records, k))
    bwd.PROGRAMS_OVERRIDE = limits.sms if limits is not None else 132
    common.DISCARD_OVERRIDE = True  # every matrix architecture is sm_80 or later
    try:
        with at.assume(limits):
            t = _shape_tensors(B, N, D, L, H, A, V, dtype, name.startswith("text"))
            out, attn, qt, lse, xp, o = op._readout_fwd(t["x"], t["eos"], t["q_emb"], t["k_weight"], t["k_bias"],
                                                        t["v_weight"], t["v_bias"], t["proj_weight"],
                                                        t["proj_bias"], True)
            op._readout_bwd(t["grad_out"], None, t["x"], t["eos"], t["q_emb"], t["k_weight"], qt,
                            t["v_weight"], t["proj_weight"], lse, xp, o, True)
            if inf.supported(L, N, D, dtype):  # the eval-mode path, where its one-tile pooling fits,
                inf.launch_infer(t["x"], t["eos"], qt, t["v_weight"], t["v_bias"], t["proj_weight"],
                                 t["proj_bias"], H, 0.125, False)  # as evaluation calls it: no attn
    finally:
        at.launch, op.wrap_triton, inf.wrap_triton, bwd.PROGRAMS_OVERRIDE, common.DISCARD_OVERRIDE = saved
    return records


def _defaults(fn) -> Dict:
    sig = inspect.signature(fn.fn)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def specialise(kernel, named: Dict, consts: Dict):
    """(signature, attrs, constexprs) for ``triton.compile``, as Triton's launcher specialises."""
    sig, attrs, c = {}, {}, {**_defaults(kernel), **consts}
    for i, a in enumerate(kernel.arg_names):
        v = named.get(a, c.get(a))
        if a in c and a not in named or v is None:
            sig[a], c[a] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[a] = "*" + _TY.get(v.dtype, {torch.int64: "i64", torch.int32: "i32"}.get(v.dtype, "i8"))
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[a] = "i1"
        elif isinstance(v, float):
            sig[a] = "fp32"
        elif v == 1:
            sig[a], c[a] = "constexpr", 1
        else:
            sig[a] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, {k: v for k, v in c.items() if sig.get(k) == "constexpr"}


def job_spec(launch: Launch, cfg: Dict, arch: int) -> Dict:
    """A picklable description of one compilation (what the cache and the workers key on)."""
    from ..sparo_readout_autotune import split

    meta, warps, stages = split(cfg)
    sig, attrs, c = specialise(launch.kernel, launch.named, {**launch.consts, **meta})
    fn = launch.kernel.fn
    return dict(module=fn.__module__, name=fn.__name__, sig=sig, attrs=sorted((k[0], v) for k, v in attrs.items()),
                consts=sorted(c.items()), warps=warps, stages=stages, arch=arch)


def _spec_hash(spec: Dict, kernel) -> str:
    text = json.dumps({**spec, "src": kernel.cache_key, "triton": triton.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cache_dir() -> Path:
    base = Path(os.environ.get("SPARO_FAST_CACHE_DIR", Path.home() / ".cache" / "sparo-fast"))
    return base / "aot" / f"triton-{triton.__version__}"


def _ptxas_info(ptx: str):
    """(registers, spill bytes) from the bundled ptxas (Triton ships a newer one for sm_100+)."""
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    newer = os.path.join(bindir, "ptxas-blackwell")
    ptxas = newer if int(re.match(r"sm_(\d+)", arch).group(1)) >= 100 and os.path.exists(newer) else \
        os.path.join(bindir, "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _matrix_ops(ptx: str) -> str:
    """Tensor-core instructions: Hopper's ``wgmma``, Blackwell's ``tcgen05``, the older
    ``mma.sync``, or none (every ``tl.dot`` became FMAs, e.g. true-fp32 products)."""
    ops = (("wgmma", "wgmma.mma_async"), ("tcgen05", "tcgen05.mma"), ("mma.sync", "mma.sync"))
    return "+".join(name for name, op in ops if op in ptx) or "none"


def _kernel(spec: Dict):
    return getattr(importlib.import_module(spec["module"]), spec["name"])


def compile_spec(spec: Dict, keep_asm: bool = False) -> Dict:
    """Compile one spec for ``sm_<arch>``: registers, spill bytes, shared bytes, tensor cores
    (or ``error``: the compiler's last line)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _kernel(spec)
    attrs = {(i,): v for i, v in spec["attrs"]}
    try:
        k = triton.compile(ASTSource(kernel, dict(spec["sig"]), dict(spec["consts"]), attrs=attrs),
                           target=GPUTarget("cuda", spec["arch"], 32),
                           options=dict(num_warps=spec["warps"], num_stages=spec["stages"]))
    except Exception as e:  # noqa: BLE001  (a compiler failure is a row of the matrix)
        root = e
        while root.__cause__ is not None:  # a CompilationError's last line is a caret: say why
            root = root.__cause__
        msg = [ln for ln in str(root).strip().splitlines() if ln.strip()] or [""]
        why = f"{type(root).__name__}: {msg[-1]}" if root is not e else msg[-1]
        return dict(error=f"{type(e).__name__}: {why}"[:240])
    ptx = k.asm["ptx"]
    regs, spill = _ptxas_info(ptx)
    if regs is None:
        return dict(error="ptxas -v gave no register count (no ptxas for this target?)")
    row = dict(regs=regs, spill_bytes=spill, shared=k.metadata.shared, matrix_ops=_matrix_ops(ptx),
               wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))))
    if keep_asm:
        row["ttir"] = k.asm["ttir"]
    return row


def cached_compile(spec: Dict) -> Dict:
    """``compile_spec`` through the on-disk cache (keyed by spec, kernel source and Triton)."""
    path = _cache_dir() / f"{_spec_hash(spec, _kernel(spec))}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    row = compile_spec(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)
    return row


def _spec_key(spec: Dict) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def _limits(arch: int, unpruned: bool):
    from ..sparo_readout_autotune import limits_for_arch

    return None if unpruned else limits_for_arch(arch)


def matrix(arch: int, shapes=SHAPES, dtypes=(torch.bfloat16, torch.float16, torch.float32), picked=False,
           jobs: int = 1, unpruned: bool = False) -> List[Dict]:
    """One row per (shape, dtype, kernel, config) for ``sm_<arch>``; every distinct compilation
    once. ``picked``: only the first config of each space (the interpreter's); ``unpruned``:
    the spaces as without a device (the 200 kB cap), not pruned for the architecture."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset")
    from ..sparo_readout_autotune import SMEM_ESTIMATES, SMEM_SPLIT, limits_for_arch

    lim = _limits(arch, unpruned)
    limit = limits_for_arch(arch).smem
    todo, rows = {}, []
    for shape in shapes:
        for dtype in dtypes:
            for ln in capture(shape, dtype, lim):
                for cfg in (ln.space[:1] if picked else ln.space):
                    spec = job_spec(ln, cfg, arch)
                    todo.setdefault(_spec_key(spec), spec)
                    full = {**ln.consts, **cfg}
                    name = ln.kernel.fn.__name__
                    est = SMEM_ESTIMATES.get(name) or SMEM_SPLIT.get(name)  # split: older Tritons
                    rows.append(dict(shape=shape[0], dtype=_TY[dtype], kernel=name, config=cfg,
                                     consts={k: v for k, v in ln.consts.items() if k.isupper()},
                                     one_tile=ln.consts.get("ONE_TILE"), arch=arch, limit=limit,
                                     smem_estimate=est(full, full, dtype) if est else None,
                                     _spec=_spec_key(spec)))
    results = _run_all(list(todo.values()), jobs)
    done = dict(zip(todo, results))
    for r in rows:
        res = done[r.pop("_spec")]
        r.update(res)
        r["fits"] = "error" not in res and res["shared"] <= limit
    return rows


def _run_all(specs: List[Dict], jobs: int) -> List[Dict]:
    if jobs <= 1 or len(specs) <= 1:
        return [cached_compile(s) for s in specs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(cached_compile, specs, chunksize=1)


@triton.jit
def _i32_offsets_demo(X, Y, N, stride_xn, BN: tl.constexpr):
    """A negative control for ``int64_report``: token index x stride in i32 (wraps past 2^31)."""
    offs = tl.arange(0, BN)
    tl.store(Y + offs, tl.load(X + offs * stride_xn, mask=offs < N))


def _i32_stride_uses(launch: Launch, cfg: Dict, arch: int = 90) -> Dict:
    """TTIR lines that use x's stride arguments other than to sign-extend them to i64."""
    spec = job_spec(launch, cfg, arch)
    res = compile_spec(spec, keep_asm=True)
    if "ttir" not in res:
        raise RuntimeError(f"{spec['name']}: {res.get('error')}")
    ttir = res["ttir"]  # triton 3.8 names the SSA values of the arguments after them
    out = {}
    for a in ("stride_xn", "stride_xb"):
        if spec["sig"].get(a) == "i32":
            v = "%" + a
            uses = [ln.strip() for ln in ttir.splitlines() if re.search(re.escape(v) + r"\b", ln) and "tt.func" not in ln]
            # sign-extended to i64, or already i64 (a called function's copy: the kernel passes it widened)
            ext = [u for u in uses if re.search(r"arith\.extsi " + re.escape(v) + r"\b.*: i32 to i64", u)
                   or re.search(re.escape(v) + r"\s*:\s*i64\b", u)]
            out[a] = dict(i64=len(ext), other=[u for u in uses if u not in ext])
    return out


def int64_report(arch: int = 90) -> Dict:
    """For the kernels that read x (one-tile and long paths) and a negative control: per stride of
    x, how many uses sign-extend it to i64 and the other uses (none = every token-index x stride
    product is int64). Strides are those of a sequence-first [N, B, D] view."""
    res = {}
    for n in (100, 300):  # fp16, L = 64: one-tile at N = 100, the long path at N = 300
        for ln in capture(("int64", 4, n, 64, 64, 64, 64, 64), torch.float16, None):
            if "stride_xn" in ln.named:
                ln.named.update(stride_xb=64, stride_xn=4 * 64 * 7)
                one = ln.consts.get("ONE_TILE", True)  # the inference kernel: always one tile
                res[f"{ln.kernel.fn.__name__}:{one}"] = _i32_stride_uses(ln, ln.space[0], arch)
    demo = Launch(_i32_offsets_demo, dict(X=torch.empty(1, dtype=torch.float16, device="meta"),
                                          Y=torch.empty(1, dtype=torch.float16, device="meta"), N=300, stride_xn=448),
                  dict(BN=64))
    res["_bad"] = _i32_stride_uses(demo, dict(num_warps=4, num_stages=1), arch)
    return res


def markdown(rows: List[Dict]) -> str:
    """One line per (shape, dtype, kernel): configs, fitting spill-free ones, ranges."""
    seen: Dict = {}
    for r in rows:
        seen.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
    out = ["| shape | dtype | kernel | configs | fit, no spill | registers | spill bytes | shared kB | tensor cores |",
           "| --- | --- | --- | ---: | ---: | --- | ---: | --- | --- |"]
    rng = (lambda v: "-" if not v else f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}")  # noqa: E731
    for (shape, dt, kern), rs in seen.items():
        ok = [x for x in rs if "error" not in x]
        good = sum(1 for x in ok if x["fits"] and not x["spill_bytes"])
        mma = sorted({x["matrix_ops"] for x in ok}) or ["error"]
        out.append(f"| {shape} | {dt} | `{kern}` | {len(rs)} | {good} | {rng(sorted({x['regs'] for x in ok}))} | "
                   f"{max([x['spill_bytes'] or 0 for x in ok], default='-')} | "
                   f"{rng(sorted({round(x['shared'] / 1024) for x in ok}))} | {'; '.join(mma)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help=f"compute capability x 10 (e.g. {', '.join(map(str, ARCHS))})")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the rows as JSON (no FILE: stdout)")
    ap.add_argument("--picked", action="store_true", help="only the first config of each space")
    ap.add_argument("--every-config", action="store_true", help="(the default; kept for old command lines)")
    ap.add_argument("--unpruned", action="store_true", help="spaces not pruned for the architecture")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--int64", action="store_true", help="report non-int64 uses of x's strides (TTIR)")
    ap.add_argument("--markdown", action="store_true", help="a markdown table")
    a = ap.parse_args(argv)
    inv = {v: k for k, v in _TY.items()}
    try:
        dtypes = tuple(inv[d] for d in a.dtypes.split(","))
    except KeyError as e:
        ap.error(f"unknown dtype {e}; use bf16, fp16, fp32")
    names = a.shapes.split(",")
    if set(names) - {s[0] for s in SHAPES}:
        ap.error(f"unknown shapes {sorted(set(names) - {s[0] for s in SHAPES})}")
    if a.int64:
        json.dump(int64_report(a.arch), sys.stdout)
        return
    rows = matrix(a.arch, tuple(s for s in SHAPES if s[0] in names), dtypes, picked=a.picked, jobs=a.jobs,
                  unpruned=a.unpruned)
    if a.json:
        text = json.dumps(rows)
        sys.stdout.write(text) if a.json == "-" else Path(a.json).write_text(text)
    if a.markdown:
        print(markdown(rows))
    elif a.json in (None,) or a.json != "-":
        for r in rows:
            print(f"{r['shape']:10s} {r['dtype']:5s} {r['kernel']:18s} {r['config']} regs={r.get('regs')} "
                  f"spill={r.get('spill_bytes')} shared={r.get('shared')}/{r['limit']} fits={r['fits']} "
                  f"mma={r.get('matrix_ops', r.get('error'))}")


if __name__ == "__main__":
    main()
