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
         "_bwd_slot_kernel": "slot", "_bwd_finish_kernel": "finish", "_fwd_fused_kernel": "fwd",
         "_bwd_fused_kernel": "bwd"}
#: the largest kernel of a matrix (registers and shared memory): the persistent backward, or in
#: matrices of the split kernels their token stage
BIGGEST = ("_bwd_fused_kernel", "_bwd_token_kernel")


def _short(kernel: str) -> str:
    return SHORT.get(kernel, kernel.strip("_").removesuffix("_kernel"))


ORDER = ("vit_b32", "vit_b16", "text_b", "vit_l14", "tiny", "text_tiny", "slots128", "few_slots")


def _order(key):
    shape, dtype = key
    return (ORDER.index(shape) if shape in ORDER else len(ORDER), shape, ("bf16", "fp16", "fp32").index(dtype))


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
    """Fitting spill-free configs / configs over all kernels, the backward kernel's first such
    config (the largest kernel: registers and shared memory), and any kernel with none."""
    rows = [r for rs in kernels.values() for r in rs]
    text = f"{sum(map(good, rows))}/{len(rows)}"
    big = next((k for k in BIGGEST if k in kernels), None)
    tok = next((r for r in kernels.get(big, []) if good(r)), None)
    if tok is not None:
        text += f" · {_short(big)} {tok['regs']} regs {round(tok['shared'] / 1024)} kB"
    none = sorted(_short(k) for k, rs in kernels.items() if not any(map(good, rs)))
    return text + (f" · **none: {', '.join(none)}**" if none else "")


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
             "Per Triton version, architecture, shape and dtype: configs (all kernels, every config of every "
             "space as pruned for the architecture) that compile, fit its shared memory per block and spill "
             "nothing, out of all; the backward kernel's first such config; kernels with none. Text "
             "shapes have EOS indices; the attention weights get no gradient. A config that spills on one "
             "architecture stays in its space there: autotuning on that GPU reads each compiled config's "
             "spills and picks the fastest spill-free one. Regenerate with "
             "`python -m sparo_fast_kernels.testing.compile_matrix --versions ...` then `python bench/render.py`.",
             ""]
    fails = []
    for version, archs in data["versions"].items():
        ok_archs = {a: rs for a, rs in archs.items() if isinstance(rs, list)}
        keys = sorted({k for rs in ok_archs.values() for k in cells(rs)}, key=_order)
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
