"""Set-up of a ``pytest bench/`` run (the read-out benchmarks).

* Without a GPU, TRITON_INTERPRET=1 is set here, before any Triton kernel is imported, so
  the smoke test can check the triton backend under the interpreter.
* ``--benchmark-disable`` is the smoke mode: tiny batches, every case run once and checked
  against the float64 reference, nothing written.
* Otherwise every case is timed and the rows go to ``bench/results/<device>.json`` (merged
  with the rows already there, by shape, dtype, impl and pass), then ``bench/RESULTS.md`` is
  re-rendered.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# tests/accuracy.py: the one accuracy criterion, shared with the unit tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import pytest  # noqa: E402

import render  # noqa: E402
import sparo_readout_bench as sb  # noqa: E402
from sparo_fast_kernels.testing.interpreter_trace import sanitize_if_interpreting  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("sparo-bench")
    group.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device of the read-out benchmarks (auto: cuda when available)")
    group.addoption("--bench-out", default=None,
                    help="results JSON to write (default bench/results/<device>.json)")
    group.addoption("--bench-no-save", action="store_true",
                    help="time the cases but write no results file")
    group.addoption("--bench-threads", type=int, default=1,
                    help="CPU runs: torch threads (default 1, timed in CPU time with "
                         "time.process_time so that other processes on a shared machine do not "
                         "count; with more threads the timer stays wall-clock)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """CPU timed runs: one torch thread timed in process CPU time, unless told otherwise.

    Runs before pytest-benchmark's own ``pytest_configure`` (trylast), which reads the timer.
    """
    env = _env(config)
    if env.device.type != "cpu" or env.smoke:
        return
    torch.set_num_threads(env.threads)
    if env.threads == 1 and config.getoption("benchmark_timer") == "time.perf_counter":
        config.option.benchmark_timer = "time.process_time"


class BenchEnv:
    """Facts of one pytest run: device, dtype, mode, bandwidth (measured once), collected rows."""

    def __init__(self, config):
        self.config = config
        choice = config.getoption("bench_device")
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-device cuda: no CUDA device is available")
        self.device = torch.device(choice)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # pytest-benchmark also disables itself under xdist (-n): see the ``smoke`` property
        self._smoke_option = bool(config.getoption("benchmark_disable", False)) and not bool(
            config.getoption("benchmark_enable", False))
        self.threads = config.getoption("bench_threads") if self.device.type == "cpu" else None
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self._bandwidth = None
        self.device_name = sb.device_name(self.device)
        self.torch_version = torch.__version__
        self.triton_version = sb.triton_version()
        self.date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    @property
    def smoke(self) -> bool:
        """Benchmarks disabled (``--benchmark-disable``, or pytest-benchmark under xdist)."""
        bs = getattr(self.config, "_benchmarksession", None)
        return bool(bs.disabled) if bs is not None else self._smoke_option

    def batch(self, shape: sb.Shape) -> int:
        if self.smoke:
            return sb.SMOKE_BATCH[self.device.type]
        return shape.B if self.device.type == "cuda" else max(1, shape.B // sb.CPU_BATCH_DIVISOR)

    @property
    def timer_name(self) -> str:
        return str(self.config.getoption("benchmark_timer"))

    @property
    def bandwidth(self) -> tuple[float, str]:
        if self._bandwidth is None:
            self._bandwidth = sb.measure_bandwidth(self.device, cpu_time=self.timer_name == "time.process_time")
        return self._bandwidth

    def tags(self) -> dict:
        return {"device": self.device_name, "torch": self.torch_version,
                "triton": self.triton_version, "date": self.date}

    def header(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        batches = ", ".join(f"{s.name}={self.batch(s)}" for s in sb.SHAPES.values())
        mode = "smoke (--benchmark-disable: each case once, checked, nothing written)" if self.smoke \
            else "benchmark"
        lines = [f"sparo bench: {mode}; device {self.device_name}, {dt}; batch {batches}"]
        if self.device.type == "cpu" and not self.smoke:
            lines.append(f"sparo bench: CPU run: float32 and batch = GPU batch / "
                         f"{sb.CPU_BATCH_DIVISOR} (docs/DESIGN.md, \"Benchmark shapes\"); "
                         f"{self.threads} torch thread(s), timer {self.timer_name}")
        return "\n".join(lines)


def _env(config) -> BenchEnv:
    env = getattr(config, "_sparo_bench_env", None)
    if env is None:
        env = config._sparo_bench_env = BenchEnv(config)
    return env


def pytest_report_header(config):
    try:
        return _env(config).header()
    except pytest.UsageError:
        return None


@pytest.fixture(autouse=True)
def _sanitize_interpreter_kernels():
    """As in tests/: under the interpreter, an unmasked load/store outside the launch's tensors fails."""
    with sanitize_if_interpreting():
        yield


@pytest.fixture(scope="session")
def bench_env(request) -> BenchEnv:
    return _env(request.config)


def _merge_write(env: BenchEnv, path: Path) -> None:
    key = lambda r: (r["shape"], r["dtype"], r["impl"], r["pass"])  # noqa: E731
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    new_keys = {key(r) for r in env.rows} | {key(r) for r in env.skipped}
    rows = [r for r in old.get("rows", []) if key(r) not in new_keys] + env.rows
    skipped = [r for r in old.get("skipped", []) if key(r) not in new_keys] + env.skipped
    order = {n: i for i, n in enumerate(sb.SHAPES)}
    impl_order = {n: i for i, n in enumerate(sb.IMPLS)}
    sort = lambda r: (order.get(r["shape"], 99), r["pass"], impl_order.get(r["impl"], 99))  # noqa: E731
    rows.sort(key=sort)
    skipped.sort(key=sort)
    # speed-up against the eager reference of the same shape, dtype and pass
    ref = {(r["shape"], r["dtype"], r["pass"]): r["median_ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        base = ref.get((r["shape"], r["dtype"], r["pass"]))
        r["speedup_vs_reference"] = round(base / r["median_ms"], 3) if base and r["median_ms"] else None
    bw, how = env.bandwidth
    doc = {
        **env.tags(),
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads() if env.device.type == "cpu" else None,
        "timer": env.timer_name if env.device.type == "cpu" else "time.perf_counter, CUDA synchronised",
        "bandwidth_gbs": round(bw / 1e9, 2),
        "bandwidth_method": how,
        "notes": [
            "median_ms: median over rounds after warm-up; inputs rotate among several buffers "
            "that together overflow the last-level cache twice",
            "floor_ms: bytes that must move (read x and weights, write y; fwd_bwd adds the "
            "backward: read x, dy, weights, write dx and weight grads) / bandwidth_gbs",
            "peak_mem_mb: extra memory of one call over what was allocated before it "
            "(outputs and gradients included; inputs and parameters not)",
            "load1: the machine's 1-minute load average when the row was measured (other "
            "processes on a shared machine disturb CPU timings)",
            "all implementations run with need_weights=False (the training path: attn is "
            "not returned) and input checks off",
        ] + ([f"CPU: float32, batch = GPU batch / {sb.CPU_BATCH_DIVISOR}, {env.threads} torch "
              f"thread(s), timer {env.timer_name}"
              + (" (CPU time of the process: other processes on a shared machine do not count)"
                 if env.timer_name == "time.process_time" else "")]
             if env.device.type == "cpu" else []),
        "rows": rows,
        "skipped": skipped,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def pytest_sessionfinish(session, exitstatus):
    env = getattr(session.config, "_sparo_bench_env", None)
    if env is None or env.smoke or not env.rows or session.config.getoption("bench_no_save"):
        return
    out = session.config.getoption("bench_out")
    path = Path(out) if out else sb.RESULTS_DIR / f"{sb.results_slug(env.device)}.json"
    _merge_write(env, path)
    render.main([])
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"sparo bench: wrote {path} and {sb.RESULTS_MD}")
