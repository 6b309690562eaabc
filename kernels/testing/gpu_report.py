"""One command for a user with an NVIDIA GPU: run the kernel tests and the timed benchmark, and
write one JSON to attach to a bug report.

``python -m sparo_fast_kernels.testing.gpu_report [--out sparo-gpu-report.json] [--no-bench]``

Run from a source checkout (it needs ``tests/`` and ``bench/``). It runs
``pytest tests/test_sparo_readout_*.py`` on CUDA (compiled kernels, bf16 included) and
``pytest bench/`` (timed; its rows go to a temporary file, not to ``bench/results/``), then
writes the device, the versions, every test's outcome, the benchmark rows and the autotuning
choices made on this GPU (the on-disk cache of ``sparo_readout_autotune``). Nothing leaves
the machine. Without a CUDA device it stops with one line.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]


def device_info() -> Dict:
    import torch

    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return dict(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
                smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None),
                cuda=torch.version.cuda, count=torch.cuda.device_count())


def versions() -> Dict:
    from importlib.metadata import PackageNotFoundError, version

    out = dict(python=platform.python_version(), platform=platform.platform())
    for pkg in ("torch", "triton", "sparo-fast", "open_clip_torch", "pytest", "pytest-benchmark"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def junit_cases(path: str) -> List[Dict]:
    """Each test case of a JUnit XML file: name, outcome, seconds, message (failures only)."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, msg = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, msg = ("skipped" if tag == "skipped" else "failed"), (el.get("message") or "")[:2000]
        out.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                        seconds=float(case.get("time") or 0), message=msg))
    return out


def run_pytest(args: List[str], timeout: int) -> Dict:
    """One pytest run in a subprocess: exit status, counts, cases and the output's tail."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-ra", f"--junitxml={xml}", *args]
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            status, tail = r.returncode, (r.stdout + r.stderr)[-6000:]
        except subprocess.TimeoutExpired as e:
            status, tail = "timeout", str(e.stdout or "")[-6000:]
        cases = junit_cases(xml) if os.path.exists(xml) else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return dict(command=" ".join(cmd[2:]), exit_status=status, counts=counts, cases=cases, output_tail=tail)


def autotune_choices() -> Dict:
    from .. import sparo_readout_autotune as at

    path = at.cache_path()
    try:
        return dict(cache=str(path), choices=json.loads(path.read_text()))
    except (OSError, ValueError):
        return dict(cache=str(path), choices={})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sparo-gpu-report.json")
    ap.add_argument("--no-bench", action="store_true", help="tests only")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    a = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_report needs an NVIDIA GPU: torch.cuda.is_available() is False here", file=sys.stderr)
        return 2
    if not (ROOT / "tests").is_dir() or not (ROOT / "bench").is_dir():
        print(f"gpu_report needs a source checkout (tests/ and bench/ next to {ROOT / 'kernels'})", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    report = dict(created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=device_info(), versions=versions())
    tests = sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "tests" / "test_sparo_readout_*.py")))
    report["tests"] = run_pytest(tests, a.timeout)
    if not a.no_bench:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "bench.json")
            report["bench"] = run_pytest(["bench", f"--bench-out={out}"], a.timeout)
            report["bench"]["rows"] = json.loads(Path(out).read_text()) if os.path.exists(out) else None
    report["autotune"] = autotune_choices()
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    t = report["tests"]["counts"]
    print(f"{a.out}: tests {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
          + ("" if a.no_bench else f"; benchmark exit status {report['bench']['exit_status']}"))
    return 0 if not t["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
