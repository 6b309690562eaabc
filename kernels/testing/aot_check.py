"""Compile the SPARO kernels for a GPU target without a GPU, and report registers and spills.

``python -m sparo_fast_kernels.testing.aot_check [--arch 90] [--json] [--every-config] [--jobs J]``
compiles every kernel with the launch configuration the ops would pick under the interpreter
(the first config of its ``autotune.py`` space) or, with ``--every-config``, every config of
every space, for a set of shapes and dtypes (Triton's own
``triton.compile`` with a ``GPUTarget``, then the bundled ``ptxas -v``), so that a machine
without a GPU can still check that the kernels lower to sm_90 code and do not spill.
Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces the JIT functions).

Runtime specialisation is mimicked: pointers and the sizes/strides that are multiples of 16
get ``tt.divisibility=16`` and unit strides become constants, as Triton's launcher does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: (name, B, N, D, L, H, A/Vd, V): benchmark shapes plus the extremes the kernels accept
SHAPES = (
    ("vit_b16", 256, 197, 768, 64, 64, 64, 64),
    ("vit_b32", 512, 50, 768, 64, 64, 64, 64),
    ("text_b", 256, 77, 512, 64, 64, 64, 64),
    ("vit_l14", 128, 257, 1024, 64, 64, 64, 64),
    ("slots128", 8, 1030, 1290, 128, 4, 40, 33),
    ("few_slots", 8, 50, 96, 6, 3, 256, 10),
)


def _specialise(fn, ptrs, values, consts):
    sig, attrs, c = {}, {}, {**({"UPCAST": False} if "UPCAST" in fn.arg_names else {}), **consts}
    for i, a in enumerate(fn.arg_names):
        if a in ptrs:
            sig[a] = ptrs[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in c:
            sig[a] = "constexpr"
        else:
            v = values[a]
            if isinstance(v, float):
                sig[a] = "fp32"
            elif v == 1:
                c[a] = 1
                sig[a] = "constexpr"
            else:
                sig[a] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, c


def _ptxas_info(ptx: str):
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    r = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _jobs(name, B, N, D, L, H, A, V, dtype, every):
    """(kernel, pointer types, scalar values, constexprs, config) of each kernel for one shape."""
    from .. import sparo_readout_autotune as at
    from ..sparo_readout_bwd import _bwd_finish_kernel, _bwd_slot_kernel, _bwd_token_kernel
    from ..sparo_readout_fwd import _fwd_pool_kernel, _fwd_proj_kernel, dot_precision

    t = _TY[dtype]
    prec = dot_precision(dtype)
    S = L // H
    pick = (lambda sp: sp) if every else (lambda sp: sp[:1])
    jobs = []
    meta = at.pool_meta(L, N, D, dtype)
    for cfg in pick(at.pool_space(L, N, D, dtype)):
        jobs.append((_fwd_pool_kernel,
                     dict(X=f"*{t}", EOS="*i64", QT=f"*{t}", SCR="*fp32", ATTN=f"*{t}", LSE="*fp32", XP=f"*{t}"),
                     dict(scale=0.125, B=B, N=N, D=D, L=L, S=S, stride_xb=N * D, stride_xn=D, stride_xd=1),
                     dict(HAS_EOS=True, NEED_WEIGHTS=True, DOT_PREC=prec, **meta), cfg))
    meta = at.proj_meta(B * S, D, A, V, dtype)
    for cfg in pick(at.proj_space(B * S, D, A, V, dtype)):
        jobs.append((_fwd_proj_kernel,
                     dict(XP=f"*{t}", WV=f"*{t}", BV=f"*{t}", WO=f"*{t}", BO=f"*{t}", O=f"*{t}", OUT=f"*{t}"),
                     dict(M=B * S, S=S, L=L, D=D, VD=A, V=V), dict(DOT_PREC=prec, **meta), cfg))
    meta = at.bwd_meta(L, N, D, dtype)
    for cfg in pick(at.bwd_space(L, N, D, dtype)):
        jobs.append((_bwd_token_kernel,
                     dict(X=f"*{t}", EOS="*i64", LSE="*fp32", GA=f"*{t}", GXP=f"*{t}", QT=f"*{t}", SCR="*fp32",
                          DX=f"*{t}", DQT="*fp32"),
                     dict(scale=0.125, B=B, N=N, D=D, L=L, S=S, NPROG=132, stride_xb=N * D, stride_xn=D,
                          stride_xd=1, stride_gab=L * N, stride_gal=N, stride_gan=1),
                     dict(HAS_EOS=True, HAS_GA=True, DOT_PREC=prec, **meta), cfg))
    meta = at.slot_meta(B * S, D, A, V, dtype)
    for cfg in pick(at.slot_space(B * S, D, A, V, dtype)):
        jobs.append((_bwd_slot_kernel,
                     dict(G=f"*{t}", O=f"*{t}", XP=f"*{t}", WV=f"*{t}", WO=f"*{t}", GXP=f"*{t}", DWV=f"*{t}",
                          DBV=f"*{t}", DWO_P="*fp32", DBO_P="*fp32"),
                     dict(B=B, S=S, L=L, D=D, VD=A, V=V), dict(DOT_PREC=prec, **meta), cfg))
    for cfg in at.finish_space(S, A, D):
        jobs.append((_bwd_finish_kernel,
                     dict(PART="*fp32", QE=f"*{t}", WK=f"*{t}", DWV=f"*{t}", DWO_P="*fp32", DBO_P="*fp32",
                          DQ=f"*{t}", DWK=f"*{t}", DWO=f"*{t}", DBO=f"*{t}"),
                     dict(NP=132, H=H, S=S, A=A, D=D, V=V, VD=A, NV=-(-V // H)), dict(SHARED=True, **at.finish_meta(S, A, H, A, V)),
                     cfg))
    return [(name, t) + j for j in jobs]


def compile_one(job, arch: int = 90, keep_asm: bool = False):
    """Compile one job for ``sm_<arch>`` and return its report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..sparo_readout_autotune import split

    name, t, fn, ptrs, values, consts, cfg = job
    meta, warps, stages = split(cfg)
    sig, attrs, c = _specialise(fn, ptrs, values, {**consts, **meta})
    k = triton.compile(ASTSource(fn, sig, c, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    regs, spill = _ptxas_info(k.asm["ptx"])
    row = dict(shape=name, dtype=t, kernel=fn.__name__, num_warps=warps, num_stages=stages,
               shared=k.metadata.shared, regs=regs, spill_bytes=spill, matrix_ops=_matrix_ops(k.asm["ptx"]),
               wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)",
                                                  k.asm["ptx"]))),
               blocks={k2: v for k2, v in meta.items()}, one_tile=consts.get("ONE_TILE"))
    if keep_asm:
        row["ttir"] = k.asm["ttir"]
    return row


def _worker(args):
    job_index, every, arch, shapes, dtypes = args
    jobs = [j for s in shapes for d in dtypes for j in _jobs(*s, d, every)]
    return compile_one(jobs[job_index], arch)


def compile_all(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), shapes=SHAPES,
                every: bool = False, jobs: int = 1):
    """Compile each kernel for each shape and dtype: the picked (first) config, or with ``every``
    every config of its autotuning space; ``jobs`` > 1 compiles in worker processes."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset")
    all_jobs = [j for s in shapes for d in dtypes for j in _jobs(*s, d, every)]
    if jobs <= 1:
        return [compile_one(j, arch) for j in all_jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_worker, [(i, every, arch, shapes, dtypes) for i in range(len(all_jobs))])


@triton.jit
def _i32_offsets_demo(X, Y, N, stride_xn, BN: tl.constexpr):
    """A negative control for ``int64_report``: token index x stride in i32 (wraps past 2^31)."""
    offs = tl.arange(0, BN)
    tl.store(Y + offs, tl.load(X + offs * stride_xn, mask=offs < N))


def _i32_stride_uses(fn, ptrs, values, consts, cfg, arch=90):
    """TTIR lines that use x's stride arguments other than to sign-extend them to i64."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta, w, st = cfg
    sig, attrs, c = _specialise(fn, ptrs, values, {**consts, **meta})
    k = triton.compile(ASTSource(fn, sig, c, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=w, num_stages=st))
    ttir = k.asm["ttir"]  # triton 3.8 names the SSA values of the arguments after them
    out = {}
    for a in ("stride_xn", "stride_xb"):
        if sig.get(a) == "i32":
            v = "%" + a
            uses = [ln.strip() for ln in ttir.splitlines()
                    if re.search(re.escape(v) + r"\b", ln) and "tt.func" not in ln]
            ext = [u for u in uses if re.search(r"arith\.extsi " + re.escape(v) + r"\b.*: i32 to i64", u)]
            out[a] = dict(i64=len(ext), other=[u for u in uses if u not in ext])
    return out


def int64_report(arch: int = 90):
    """For the kernels that read x (one-tile and long paths) and a negative control: per stride of
    x, how many uses sign-extend it to i64 and the other uses (none = every token-index x stride
    product is int64). Strides are those of a sequence-first [N, B, D] view."""
    from ..sparo_readout_autotune import split

    res = {}
    for n in (100, 300):  # fp16, L = 64: one-tile at N = 100, the long path at N = 300
        for name, t, fn, ptrs, values, consts, cfg in _jobs("int64", 4, n, 64, 64, 64, 64, 64, torch.float16, False):
            if "stride_xn" in values:
                values = dict(values, stride_xb=64, stride_xn=4 * 64 * 7)
                res[f"{fn.__name__}:{consts['ONE_TILE']}"] = _i32_stride_uses(fn, ptrs, values, consts, split(cfg),
                                                                               arch)
    res["_bad"] = _i32_stride_uses(_i32_offsets_demo, dict(X="*fp16", Y="*fp16"), dict(N=300, stride_xn=448),
                                   dict(BN=64), (dict(), 4, 1), arch)
    return res


def _matrix_ops(ptx: str) -> str:
    """Which tensor-core instructions the kernel uses: Hopper's ``wgmma``, the older
    ``mma.sync``, or none (then every ``tl.dot`` became scalar FMAs, e.g. true-fp32 dots)."""
    kinds = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx]
    return "+".join(kinds) or "none"


def markdown(rep) -> str:
    """The report as a markdown table: one row per (shape, dtype, kernel), configs summarised."""
    rows, seen = [], {}
    for r in rep:
        seen.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
    out = ["| shape | dtype | kernel | configs | warps | registers | spill bytes | shared kB | tensor cores |",
           "| --- | --- | --- | ---: | --- | --- | ---: | --- | --- |"]
    for (shape, dt, kern), rs in seen.items():
        regs = sorted({x["regs"] for x in rs})
        sh = sorted({round(x["shared"] / 1024) for x in rs})
        mma = sorted({x["matrix_ops"] + (" " + ",".join(x["wgmma_shapes"]) if x["wgmma_shapes"] else "") for x in rs})
        rng = (lambda v: f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}")
        out.append(f"| {shape} | {dt} | `{kern}` | {len(rs)} | {rng(sorted({x['num_warps'] for x in rs}))} | "
                   f"{rng(regs)} | {max(x['spill_bytes'] or 0 for x in rs)} | {rng(sh)} | {'; '.join(mma)} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--every-config", action="store_true", help="every config of every autotuning space")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ap.add_argument("--int64", action="store_true", help="report non-int64 uses of x's strides (TTIR)")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (bench/RESULTS.md's compile report)")
    a = ap.parse_args(argv)
    inv = {v: k for k, v in _TY.items()}
    dtypes = tuple(inv[d] for d in a.dtypes.split(","))
    shapes = tuple(s for s in SHAPES if s[0] in a.shapes.split(","))
    if a.int64:
        json.dump(int64_report(a.arch), sys.stdout)
        return
    rep = compile_all(a.arch, dtypes, shapes, every=a.every_config, jobs=a.jobs)
    if a.json:
        json.dump(rep, sys.stdout)
    elif a.markdown:
        print(markdown(rep))
    else:
        for r in rep:
            print(f"{r['shape']:10s} {r['dtype']:5s} {r['kernel']:18s} warps={r['num_warps']} "
                  f"stages={r['num_stages']} regs={r['regs']} spill={r['spill_bytes']} shared={r['shared']} "
                  f"mma={r['matrix_ops']} {','.join(r['wgmma_shapes'])} {r['blocks']}")


if __name__ == "__main__":
    main()
