"""Render ``bench/results/compile-matrix.json`` (``python -m sparo_fast_kernels.testing.compile_matrix``)
as the compile section of ``bench/RESULTS.md``: compiled, not timed.

``python bench/compile_render.py [matrix.json]`` prints it; ``render.py`` includes it.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

MATRIX = Path(__file__).parent / "results" / "compile-matrix.json"
SHORT = {"_fwd_pool_kernel": "pool", "_fwd_proj_kernel": "proj", "_bwd_token_kernel": "token",
         "_bwd_slot_kernel": "slot", "_bwd_finish_kernel": "finish"}


def _short(kernel: str) -> str:
    return SHORT.get(kernel, kernel.strip("_").removesuffix("_kernel"))


def good(row: Dict) -> bool:
    """Compiles, fits the architecture's shared memory per block, spills nothing."""
    return "error" not in row and row["fits"] and not row["spill_bytes"]


def cells(rows: List[Dict]) -> Dict:
    """{(shape, dtype): {kernel: [rows in space order]}}."""
    out: Dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(r["shape"], r["dtype"])][r["kernel"]].append(r)
    return out


def _cell(kernels: Dict) -> str:
    """Fitting spill-free configs of the kernel with the fewest, and that kernel's first one."""
    counts = {k: sum(map(good, rs)) for k, rs in kernels.items()}
    worst = min(counts, key=lambda k: (counts[k], k))
    first = next((r for r in kernels[worst] if good(r)), None)
    if first is None:
        return f"**0** ({_short(worst)})"
    return f"{counts[worst]} ({_short(worst)}: {first['regs']} regs, {round(first['shared'] / 1024)} kB)"


def failures(version: str, arch: str, rows: List[Dict]) -> List[str]:
    out = []
    for (shape, dt), kernels in cells(rows).items():
        for k, rs in kernels.items():
            if any(map(good, rs)):
                continue
            ok = [r for r in rs if "error" not in r]
            why = (f"error: {rs[0]['error']}" if not ok else
                   f"least shared {min(r['shared'] for r in ok) // 1024} kB of {ok[0]['limit'] // 1024} kB, "
                   f"least spill {min(r['spill_bytes'] or 0 for r in ok)} B")
            out.append(f"| {version} | sm_{arch} | {shape} | {dt} | `{_short(k)}` | {len(rs)} | {why} |")
    return out


def _spills(rows: List[Dict]) -> str:
    sp = [r for r in rows if "error" not in r and r["spill_bytes"]]
    if not sp:
        return "none"
    worst = max(sp, key=lambda r: r["spill_bytes"])
    return (f"{len(sp)} of {len(rows)} configs; worst {worst['spill_bytes']} B "
            f"({worst['shape']} {worst['dtype']} {_short(worst['kernel'])})")


def render(data: Dict) -> str:
    lines = ["### Compile matrix (compiled with Triton's `triton.compile` and `ptxas -v`, not run)", "",
             "Per Triton version, architecture, shape and dtype: how many configs of the worst-served kernel "
             "compile, fit the architecture's shared memory per block and spill nothing, and that kernel's "
             "first such config (the one the CPU interpreter would pick). Regenerate with "
             "`python -m sparo_fast_kernels.testing.compile_matrix --versions ...` then `python bench/render.py`.",
             ""]
    fails = []
    for version, archs in data["versions"].items():
        ok_archs = {a: rs for a, rs in archs.items() if isinstance(rs, list)}
        keys = sorted({k for rs in ok_archs.values() for k in cells(rs)}, key=lambda k: (k[0], k[1]))
        lines += [f"**Triton {version}**", "", "| shape | dtype | " + " | ".join(f"sm_{a}" for a in ok_archs) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in ok_archs) + " |"]
        per = {a: cells(rs) for a, rs in ok_archs.items()}
        for key in keys:
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(_cell(per[a][key]) if key in per[a] else "-"
                                                                 for a in ok_archs) + " |")
        lines += ["", "Spills: " + "; ".join(f"sm_{a}: {_spills(rs)}" for a, rs in ok_archs.items())]
        lines += [f"Not compiled for sm_{a}: {e['error']}" for a, e in archs.items() if not isinstance(e, list)]
        lines.append("")
        for a, rs in ok_archs.items():
            fails += failures(version, a, rs)
    lines += ["**Cells without a fitting, spill-free config**", ""]
    if fails:
        lines += ["| Triton | arch | shape | dtype | kernel | configs | why |",
                  "| --- | --- | --- | --- | --- | ---: | --- |", *fails]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def section(path: Path = MATRIX) -> List[str]:
    """The rendered lines, or none when the matrix has not been generated."""
    return render(json.loads(path.read_text())).splitlines() if path.exists() else []


if __name__ == "__main__":
    print(render(json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else MATRIX).read_text())))
