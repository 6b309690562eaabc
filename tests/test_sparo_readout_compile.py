"""The kernels lower to machine code for every supported GPU: configs that fit each architecture's
shared memory without spills, Hopper's wgmma on sm_90, int64 offsets.

No GPU is needed: ``sparo_fast_kernels.testing.aot_check`` compiles the kernels (``triton.compile`` with
``GPUTarget("cuda", 90, 32)``, then the ``ptxas`` bundled with Triton) in a subprocess without
``TRITON_INTERPRET`` (the pytest process itself runs the interpreter). This catches what the
interpreter does not check: ``tl.dot`` shape rules, layouts, shared memory, register pressure
and which tensor-core instructions the products become. It does not run the code.

By default every config of every space is compiled at vit_b16 in bf16 (the target shape) and
the picked config at the other shapes; ``SPARO_AOT_ALL=1`` compiles every config of every
space at every shape and dtype (minutes). The committed compile matrix
(``bench/results/compile-matrix.json``) is checked against the current spaces and the
shared-memory estimates that prune them, and a small live compile per architecture backs it.
"""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
needs_ptxas = pytest.mark.skipif(not os.path.exists(PTXAS), reason="Triton's NVIDIA backend (ptxas) is not installed")
ALL = os.environ.get("SPARO_AOT_ALL") == "1"
# every kernel the ops launch has a shared-memory estimate (the pruning needs one)
KERNELS = set(importlib.import_module("sparo_fast_kernels.sparo_readout_autotune").SMEM_ESTIMATES)
# kernels launched with one fixed config (no space to enumerate)
ONE_CONFIG = {"_bwd_finish_kernel", "_absorb_kernel", "_infer_kernel"}


def _launched(shape: str, dtype: str) -> set:
    """The kernels the ops launch at a compile-matrix shape: the inference kernel only where its
    one-tile pooling takes the shape."""
    from sparo_fast_kernels import sparo_readout_infer as inf
    from sparo_fast_kernels.testing import aot_check
    _, _, N, D, L, *_ = next(s for s in aot_check.SHAPES if s[0] == shape)
    dt = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    return KERNELS - (set() if inf.supported(L, N, D, getattr(__import__("torch"), dt)) else {"_infer_kernel"})


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _aot(*args, arch=90):
    r = subprocess.run([sys.executable, "-m", "sparo_fast_kernels.testing.aot_check", "--arch", str(arch), "--json",
                        *args],
                       capture_output=True, text=True, env=_env(), timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


def _check_row(x):
    assert x["regs"] is not None and x["regs"] <= 255, x
    assert x["shared"] <= 227 * 1024 and x["fits"], x  # H100 shared memory per block
    if x["shape"] in ("slots128", "few_slots"):
        # the extremes the kernels accept (L = 128 slots; value width 256 with 6 slots): correctness
        # shapes, where ptxas may spill a little (the tiles hold all slots or a whole value row)
        assert x["spill_bytes"] <= 1024, x
    elif x["dtype"] == "fp32":  # true-fp32 FMA products: ptxas spills a few bytes in some configs
        assert x["spill_bytes"] <= 128, x  # (every cell keeps a spill-free one: test_matrix_every_cell_...)
    elif x["kernel"] == "_fwd_fused_kernel" and x["shape"] != "vit_b16":
        # the fused forward sits at 255 registers: a few configs spill on some architectures
        # (text_b on sm_90: 8 bytes; 4-256 bytes on sm_80, 100, 120); the autotuner picks a
        # spill-free one (``choose``), and every cell has one (test_matrix_every_cell_has_a_good_config)
        assert x["spill_bytes"] <= 256, x
    else:  # the benchmark shapes in half precision: no spills, in every config of every space
        assert x["spill_bytes"] == 0, x
    if x["kernel"] in ("_bwd_finish_kernel", "_absorb_kernel"):  # weight-sized work, fp32 products by design
        assert x["matrix_ops"] == "none", x
    elif x["dtype"] in ("bf16", "fp16"):
        # half precision reaches the tensor cores. Hopper's wgmma needs 64-row tiles: every product
        # of the benchmark shapes has them except the long-sequence path's dx product in the
        # backward, whose 32-token tile ([BN=32, BD]) lowers to mma.sync; so that path is
        # "wgmma+mma.sync", and the tiny-slot shape (6 slots: 16-row tiles) is mma.sync.
        if x["shape"] == "few_slots":
            assert x["matrix_ops"] in ("mma.sync", "wgmma+mma.sync", "wgmma"), x
        elif x["kernel"] == "_infer_kernel":  # its projection item's 32 ring rows: mma.sync
            assert x["matrix_ops"] == "wgmma+mma.sync", x
        elif x["kernel"] in ("_bwd_token_kernel", "_bwd_fused_kernel") and not x["one_tile"]:
            assert x["matrix_ops"] == "wgmma+mma.sync", x
        else:
            assert x["matrix_ops"] == "wgmma", x
    else:  # float32 is true fp32 (input_precision="ieee") by design: FMAs, no TF32 tensor cores
        assert x["matrix_ops"] == "none", x


@needs_ptxas
@pytest.mark.parametrize("shapes,dtypes,every", [
    ("vit_b16", "bf16", True),
    ("vit_b32,text_b,vit_l14", "bf16,fp16" + (",fp32" if ALL else ""), ALL),
    ("few_slots,slots128", "fp16", ALL),
], ids=["vit_b16-every", "benchmark-shapes", "extremes"])
def test_kernels_compile_for_sm90(shapes, dtypes, every):
    report = _aot("--shapes", shapes, "--dtypes", dtypes, *(["--jobs", "2"] if every else ["--picked"]))
    assert {x["kernel"] for x in report} == set().union(
        *(_launched(sh, dt) for sh in shapes.split(",") for dt in dtypes.split(",")))
    if every:  # more than one config per tuned kernel: the spaces are really enumerated
        for k in KERNELS - ONE_CONFIG:
            assert sum(x["kernel"] == k for x in report) >= 2, k
    for x in report:
        _check_row(x)


@needs_ptxas
def test_token_offsets_are_int64():
    """Every product of a token index and the token stride is computed in int64: in the TTIR the
    stride arguments of x (i32 at launch) are only ever sign-extended to i64, never multiplied as
    i32; and a kernel that multiplies in i32 is caught by the same check."""
    res = _aot("--int64")
    fused = {f"{k}:{one}" for k in ("_fwd_fused_kernel", "_bwd_fused_kernel") for one in (True, False)}
    assert set(res) == fused | {"_infer_kernel:True", "_bad"}
    assert res["_bad"]["stride_xn"]["other"], "the checker must flag an i32 token-index * stride product"
    for k, uses in res.items():
        if k != "_bad":
            assert set(uses) == {"stride_xn", "stride_xb"}, (k, uses)
            for a, u in uses.items():
                assert u["i64"] >= 1 and u["other"] == [], (k, a, u)


ARCHS = (80, 86, 89, 90, 100, 120)
BENCH_SHAPES = ("vit_b32", "vit_b16", "text_b", "vit_l14")
MATRIX = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "compile-matrix.json")


@needs_ptxas
def test_vit_b16_fits_every_arch():
    """A small live compile: vit_b16 in bf16, every config of every space as pruned for each
    architecture, fits its shared memory (99 kB on sm_86/89/120) and compiles; every kernel has
    a config that spills nothing (the one the autotuner's spill check leaves it), and only the
    fused forward has configs that spill (on sm_80, 100, 120)."""
    for arch in ARCHS:
        report = _aot("--shapes", "vit_b16", "--dtypes", "bf16", "--jobs", "2", arch=arch)
        assert {x["kernel"] for x in report} == KERNELS, arch
        for x in report:
            assert "error" not in x and x["fits"], (arch, x)
        for k in KERNELS:
            assert any(x["spill_bytes"] == 0 for x in report if x["kernel"] == k), (arch, k)
        assert {x["kernel"] for x in report if x["spill_bytes"]} <= {"_fwd_fused_kernel"}, arch


def _matrix_rows():
    if not os.path.exists(MATRIX):
        pytest.fail("bench/results/compile-matrix.json is missing: python -m sparo_fast_kernels.testing.compile_matrix")
    versions = json.load(open(MATRIX))["versions"]
    if triton.__version__ not in versions:
        pytest.skip(f"the committed compile matrix has no Triton {triton.__version__} (has {sorted(versions)})")
    return versions[triton.__version__]


def test_matrix_every_cell_has_a_good_config():
    """The committed matrix (the installed Triton's part): every architecture, benchmark shape,
    dtype and kernel has a config that compiles, fits and spills nothing."""
    by_arch = _matrix_rows()
    assert sorted(map(int, by_arch)) == sorted(ARCHS)
    for arch, rows in by_arch.items():
        assert isinstance(rows, list), (arch, rows)
        cells = {}
        for r in rows:
            cells.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
        for shape in BENCH_SHAPES:
            for dt in ("bf16", "fp16", "fp32"):
                kernels = {k for (sh, d, k) in cells if (sh, d) == (shape, dt)}
                assert kernels == _launched(shape, dt), (arch, shape, dt)
                for k in _launched(shape, dt):
                    rs = cells.get((shape, dt, k))
                    assert rs, (arch, shape, dt, k)
                    assert any("error" not in r and r["fits"] and r["spill_bytes"] == 0 for r in rs), (arch, shape, dt, k)


def test_matrix_every_kernel_compiles_on_every_triton_version():
    """Every Triton version of the committed matrix, down to the oldest ``setup.py`` allows:
    every architecture, shape, dtype and kernel the ops launch there has a config that compiles
    and fits (spills allowed: older Tritons spill where 3.8 does not). A kernel that compiles in
    no config fails for every user of that version."""
    import pathlib
    versions = json.load(open(MATRIX))["versions"]
    setup = (pathlib.Path(MATRIX).parents[2] / "setup.py").read_text()
    oldest = re.search(r'"triton>=(\d+\.\d+)"', setup).group(1)
    assert any(v.startswith(oldest + ".") for v in versions), (oldest, sorted(versions))
    for version, by_arch in versions.items():
        for arch, rows in by_arch.items():
            assert isinstance(rows, list), (version, arch, rows)
            cells = {}
            for r in rows:
                cells.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
            for cell, rs in cells.items():
                assert any("error" not in r and r["fits"] for r in rs), (version, arch, cell, rs[0].get("error"))


def test_matrix_is_current():
    """The committed matrix lists exactly the configs the current spaces hold for each
    architecture (so it is regenerated whenever a space or a pruning rule changes), and the
    current shared-memory estimate that prunes the spaces is never below what Triton allocated
    for any of them (run without the interpreter: the ops' launches are captured)."""
    _matrix_rows()
    r = subprocess.run([sys.executable, "-m", "sparo_fast_kernels.testing.compile_matrix", "--out", MATRIX,
                        "--check", triton.__version__], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    problems = json.loads(r.stdout)
    assert problems == [], problems[:20]
