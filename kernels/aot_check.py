"""Compile the SPARO kernels for a GPU target without a GPU, and report registers and spills.

``python -m sparo_fast_kernels.aot_check [--arch 90] [--json]`` compiles every kernel with
the launch configuration the ops would pick for a set of shapes and dtypes (Triton's own
``triton.compile`` with a ``GPUTarget``, then the bundled ``ptxas -v``), so that a session
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

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: (name, B, N, D, L, H, A/Vd, V): benchmark shapes plus the extremes the kernels accept
SHAPES = (
    ("vit_b16", 256, 197, 768, 64, 64, 64, 64),
    ("text_b", 256, 77, 512, 64, 64, 64, 64),
    ("slots128", 8, 1030, 1290, 128, 4, 40, 33),
    ("few_slots", 8, 50, 96, 6, 3, 256, 10),
)


def _specialise(fn, ptrs, values, consts):
    sig, attrs, c = {}, {}, {"UPCAST": False, **consts}
    for i, a in enumerate(fn.arg_names):
        if a in ptrs:
            sig[a] = ptrs[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in c:
            sig[a] = "constexpr"
        else:
            v = values[a]
            if v == 1:
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


def compile_all(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), shapes=SHAPES):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .sparo_bwd import _bwd_token_kernel, bwd_config
    from .sparo_fwd import _fwd_pool_kernel, _fwd_proj_kernel, dot_precision, pool_config, proj_config

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_check needs TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    report = []
    for name, B, N, D, L, H, A, V in shapes:
        S = L // H
        for dtype in dtypes:
            t = _TY[dtype]
            prec = dot_precision(dtype)
            jobs = []
            cfg = pool_config(L, N, D, dtype)
            jobs.append((_fwd_pool_kernel,
                         dict(X=f"*{t}", EOS="*i64", QT=f"*{t}", P="*fp32", ATTN=f"*{t}", XP=f"*{t}"),
                         dict(N=N, D=D, L=L, stride_xb=N * D, stride_xn=D, stride_xd=1),
                         dict(HAS_EOS=True, NEED_WEIGHTS=True, DOT_PREC=prec), cfg))
            cfg = proj_config(B * S, D, A, V, dtype)
            jobs.append((_fwd_proj_kernel,
                         dict(XP=f"*{t}", WV=f"*{t}", BV=f"*{t}", WO=f"*{t}", BO=f"*{t}", O=f"*{t}", OUT=f"*{t}"),
                         dict(M=B * S, S=S, L=L, D=D, VD=A, V=V), dict(DOT_PREC=prec), cfg))
            cfg = bwd_config(L, N, D, dtype)
            jobs.append((_bwd_token_kernel,
                         dict(X=f"*{t}", EOS="*i64", P="*fp32", GA=f"*{t}", GXP=f"*{t}", QT=f"*{t}", GS="*fp32",
                              DX=f"*{t}", DQT="*fp32"),
                         dict(B=B, N=N, D=D, L=L, G=2, stride_xb=N * D, stride_xn=D, stride_xd=1,
                              stride_gab=L * N, stride_gal=N, stride_gan=1),
                         dict(HAS_EOS=True, HAS_GA=True, DOT_PREC=prec), cfg))
            for fn, ptrs, values, consts, cfg in jobs:
                cfg = dict(cfg)
                warps = cfg.pop("num_warps")
                sig, attrs, c = _specialise(fn, ptrs, values, {**consts, **cfg})
                k = triton.compile(ASTSource(fn, sig, c, attrs=attrs), target=target,
                                   options=dict(num_warps=warps))
                regs, spill = _ptxas_info(k.asm["ptx"])
                report.append(dict(shape=name, dtype=t, kernel=fn.__name__, num_warps=warps,
                                   shared=k.metadata.shared, regs=regs, spill_bytes=spill,
                                   matrix_ops=_matrix_ops(k.asm["ptx"]),
                                   blocks={k2: v for k2, v in cfg.items()}))
    return report


def _matrix_ops(ptx: str) -> str:
    """Which tensor-core instructions the kernel uses: Hopper's ``wgmma``, the older
    ``mma.sync``, or none (then every ``tl.dot`` became scalar FMAs, e.g. true-fp32 dots)."""
    kinds = [name for name, op in (("wgmma", "wgmma.mma_async"), ("mma.sync", "mma.sync")) if op in ptx]
    return "+".join(kinds) or "none"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    inv = {v: k for k, v in _TY.items()}
    dtypes = tuple(inv[d] for d in a.dtypes.split(","))
    shapes = tuple(s for s in SHAPES if s[0] in a.shapes.split(","))
    rep = compile_all(a.arch, dtypes, shapes)
    if a.json:
        json.dump(rep, sys.stdout)
    else:
        for r in rep:
            print(f"{r['shape']:10s} {r['dtype']:5s} {r['kernel']:18s} warps={r['num_warps']} regs={r['regs']} "
                  f"spill={r['spill_bytes']} shared={r['shared']} mma={r['matrix_ops']} {r['blocks']}")


if __name__ == "__main__":
    main()
