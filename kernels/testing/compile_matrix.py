"""The compile matrix: ``aot_check`` for several Triton versions x architectures, in one JSON.

``python -m sparo_fast_kernels.testing.compile_matrix --versions 3.4.0,3.6.0,3.8.0
[--archs 80,86,89,90,100,120] [--shapes ...] [--dtypes ...] [--jobs 2] [--merge]
[--out bench/results/compile-matrix.json]``

Each Triton version other than the installed one is installed once with
``pip install --no-deps --target ~/.cache/sparo-fast/triton-X.Y.Z`` (``SPARO_FAST_CACHE_DIR``
moves it) and put first on ``PYTHONPATH`` for the ``aot_check`` subprocesses; the compile
results are cached per version, so a rerun only compiles what changed. ``bench/compile_render.py``
turns the JSON into the tables of ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

#: the row fields kept in the committed JSON
FIELDS = ("shape", "dtype", "kernel", "config", "one_tile", "regs", "spill_bytes", "shared", "smem_estimate",
          "limit", "fits", "matrix_ops", "error")


def _base() -> Path:
    return Path(os.environ.get("SPARO_FAST_CACHE_DIR", Path.home() / ".cache" / "sparo-fast"))


def triton_path(version: str) -> str:
    """A folder holding Triton ``version`` (installed there once), or "" for the installed one."""
    import triton

    if version == triton.__version__:
        return ""
    folder = _base() / f"triton-{version}"
    if not (folder / "triton" / "__init__.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder),
                        f"triton=={version}"], check=True)
    return str(folder)


def run_version(version: str, archs: List[int], shapes: str, jobs: int, dtypes: str = "") -> Dict:
    """{arch: rows} for one Triton version (rows of ``aot_check.matrix``, trimmed to FIELDS)."""
    path = triton_path(version)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    out = {}
    for arch in archs:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, "-m", "sparo_fast_kernels.testing.aot_check", "--arch", str(arch), "--jobs", str(jobs),
               "--json", tmp] + (["--shapes", shapes] if shapes else []) + (["--dtypes", dtypes] if dtypes else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["no output"])[-1]
            out[str(arch)] = dict(error=err[:300])
        else:
            rows = json.loads(Path(tmp).read_text())
            out[str(arch)] = [{k: row[k] for k in FIELDS if k in row} for row in rows]
        os.unlink(tmp)
        print(f"triton {version} sm_{arch}: {'error' if isinstance(out[str(arch)], dict) else len(out[str(arch)])}",
              flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", help="comma-separated Triton versions, e.g. 3.4.0,3.8.0")
    ap.add_argument("--check", metavar="VERSION", help="print the problems of --out's VERSION part as JSON")
    ap.add_argument("--archs", default="80,86,89,90,100,120")
    ap.add_argument("--shapes", default="", help="aot_check --shapes (default: all)")
    ap.add_argument("--dtypes", default="", help="aot_check --dtypes (default: bf16, fp16, fp32)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/compile-matrix.json")
    ap.add_argument("--merge", action="store_true", help="keep what --out holds; replace only the (version, arch) entries run now")
    a = ap.parse_args(argv)
    if a.check:
        print(json.dumps(stale(a.out, a.check)))
        return
    if not a.versions:
        ap.error("--versions or --check is needed")
    out = Path(a.out)
    data = json.loads(out.read_text()) if a.merge and out.exists() else {"versions": {}}
    for v in a.versions.split(","):
        data["versions"].setdefault(v, {}).update(run_version(v, [int(x) for x in a.archs.split(",")], a.shapes,
                                                              a.jobs, a.dtypes))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {out}")



def stale(path: str, version: str) -> List[str]:
    """Problems of the committed matrix for ``version`` against the current code: configs that
    differ from the current pruned spaces, and shared-memory estimates below what Triton
    allocated. Must run with ``TRITON_INTERPRET`` unset (the launches are captured)."""
    import torch

    from .. import sparo_readout_autotune as at
    from . import aot_check

    ty = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    problems = []
    for arch, rows in json.loads(Path(path).read_text())["versions"][version].items():
        got = {(r["shape"], r["dtype"], r["kernel"], json.dumps(r["config"], sort_keys=True)): r.get("shared")
               for r in rows}
        lim, want = at.limits_for_arch(int(arch)), {}
        for shape in aot_check.SHAPES:
            for dt in ty:
                for ln in aot_check.capture(shape, ty[dt], lim):
                    for cfg in ln.space:
                        full = {**ln.consts, **cfg}
                        with at.assume(lim):
                            est = at.SMEM_ESTIMATES[ln.kernel.fn.__name__](full, full, ty[dt])
                        want[(shape[0], dt, ln.kernel.fn.__name__, json.dumps(cfg, sort_keys=True))] = est
        problems += [f"sm_{arch}: not in the matrix: {k}" for k in want.keys() - got.keys()]
        problems += [f"sm_{arch}: no longer in the spaces: {k}" for k in got.keys() - want.keys()]
        problems += [f"sm_{arch}: estimate {want[k]} < shared {got[k]}: {k}" for k in want.keys() & got.keys()
                     if got[k] is not None and want[k] < got[k]]
    return problems


if __name__ == "__main__":
    main()
