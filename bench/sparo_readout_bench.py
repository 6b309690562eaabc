"""Helpers for the read-out benchmarks: shapes, the memory floor, peer implementations, and
measurements of bandwidth and peak memory. Imported by ``conftest.py``, the benchmark tests
and ``render.py`` (``bench/`` is a plain test directory, not a package).
"""
from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparo_fast.params import ReadoutParams

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"

# Read-out configuration of every benchmark case (docs/DESIGN.md, "Benchmark shapes"): L = 64 slots, one key/value head
# per slot (num_heads = L), A = Vd = V = 64, share_kv as in the published configs.
L_SLOTS, ATTN_DIM, VALUE_DIM, OUT_DIM = 64, 64, 64, 64
NUM_HEADS, SHARE_KV = L_SLOTS, True

# On the CPU the GPU batches are divided by this (float32 there, not bf16).
CPU_BATCH_DIVISOR = 32
SMOKE_BATCH = {"cpu": 2, "cuda": 4}
# The Triton interpreter runs every kernel program in Python: smoke-test it on a tiny shape.
INTERPRETER_SMOKE = {"batch": 2, "max_tokens": 17}


@dataclass(frozen=True)
class Shape:
    name: str
    B: int  # the GPU batch (docs/DESIGN.md, "Benchmark shapes")
    N: int
    D: int
    eos: bool


SHAPES = {s.name: s for s in (
    Shape("vit_b32", 512, 50, 768, False),
    Shape("vit_b16", 256, 197, 768, False),
    Shape("text_b", 256, 77, 512, True),
    Shape("vit_l14", 128, 257, 1024, False),
)}

IMPLS = ("reference", "reference+compile", "torch", "torch+compile", "sdpa", "xformers", "triton")
PASSES = ("fwd", "fwd_bwd", "infer")  # infer: eval() mode under no_grad (the inference path)


# ----------------------------------------------------------------------------- the floor
def param_numel(D: int) -> int:
    """Elements of the read-out's distinct parameters (the shared k/v counted once)."""
    n = L_SLOTS * ATTN_DIM + NUM_HEADS * ATTN_DIM * (D + 1)  # q_emb, k.weight, k.bias
    if not SHARE_KV:
        n += NUM_HEADS * VALUE_DIM * (D + 1)
    return n + OUT_DIM * VALUE_DIM + OUT_DIM  # proj


def floor_bytes(shape: Shape, batch: int, dtype: torch.dtype, pass_: str) -> int:
    """Bytes that must move (docs/DESIGN.md, "The floor and how bench/ counts against it").

    Forward (``fwd``, and ``infer``: the forward in eval() mode under no_grad): read x and the
    weights once, write y. Backward: read x, dy and the weights
    again, write dx and the weight gradients (about 2x the forward). ``fwd_bwd`` is both.
    """
    es = torch.empty((), dtype=dtype).element_size()
    x = batch * shape.N * shape.D * es
    y = batch * L_SLOTS * OUT_DIM * es
    w = param_numel(shape.D) * es
    eos = batch * 8 if shape.eos else 0
    fwd = x + w + y + eos
    if pass_ in ("fwd", "infer"):
        return fwd
    bwd = x + y + w + x + w + eos
    return fwd + bwd


# ----------------------------------------------------------------------------- peers
def sparo_sdpa(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams) -> Tensor:
    """The read-out through ``F.scaled_dot_product_attention``: keys and values materialised,
    Hh heads with S = L / Hh queries each (L heads of one query here). Returns y [B, L, V]."""
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    B, N, _ = x.shape
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    value_dim = v_weight.shape[0] // n_heads
    k = F.linear(x, k_weight, k_bias).view(B, N, n_heads, attn_dim).transpose(1, 2)
    if v_weight is k_weight and v_bias is k_bias:
        v = k
    else:
        v = F.linear(x, v_weight, v_bias).view(B, N, n_heads, value_dim).transpose(1, 2)
    q = q_emb.reshape(1, n_heads, n_sub, attn_dim).expand(B, -1, -1, -1)
    mask = None
    if eos_indices is not None:  # True = attend
        mask = (torch.arange(N, device=x.device)[None, :] <= eos_indices[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, Hh, S, Vd], scale 1/sqrt(A)
    return F.linear(o.reshape(B, n_heads * n_sub, value_dim), proj_weight, proj_bias)


def sparo_xformers(x: Tensor, eos_indices: Optional[Tensor], params: ReadoutParams) -> Tensor:
    """The read-out through xformers' ``memory_efficient_attention`` ([B, M, H, K] layout)."""
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    import xformers.ops as xops

    B, N, _ = x.shape
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    value_dim = v_weight.shape[0] // n_heads
    k = F.linear(x, k_weight, k_bias).view(B, N, n_heads, attn_dim)
    if v_weight is k_weight and v_bias is k_bias:
        v = k
    else:
        v = F.linear(x, v_weight, v_bias).view(B, N, n_heads, value_dim)
    q = q_emb.reshape(1, n_heads, n_sub, attn_dim).permute(0, 2, 1, 3).expand(B, -1, -1, -1).contiguous()
    bias = None
    if eos_indices is not None:
        # additive bias [B, H, M, N]; xformers wants its last dimension 8-aligned in memory
        n_pad = -(-N // 8) * 8
        after_eos = torch.arange(n_pad, device=x.device)[None, :] > eos_indices[:, None]
        bias = torch.zeros(B, n_heads, n_sub, n_pad, device=x.device, dtype=x.dtype)
        bias.masked_fill_(after_eos[:, None, None, :], float("-inf"))
        bias = bias[..., :N]
    o = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # [B, S, Hh, Vd]
    o = o.permute(0, 2, 1, 3).reshape(B, n_heads * n_sub, value_dim)
    return F.linear(o, proj_weight, proj_bias)


# ----------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} CPUs)"


def results_slug(device: torch.device) -> str:
    base = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-") or "unknown"
    return f"{device.type}-{slug}"


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return None
    return triton.__version__


def cache_bytes(device: torch.device) -> int:
    """Last-level cache size: L2 on a GPU, L3 (or the largest reported level) on the CPU."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            best = max(best, int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return best or (32 << 20)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, cpu_time: bool = False) -> tuple[float, str]:
    """Copy bandwidth in bytes/s (bytes read + bytes written per second), median of 20.

    ``cpu_time``: time the CPU copy with ``time.process_time`` (as the CPU cases are)."""
    n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.rand(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(20):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            clock = time.process_time if cpu_time else time.perf_counter
            t0 = clock()
            dst.copy_(src)
            times.append(clock() - t0)
    bw = 2 * n_bytes / statistics.median(times)
    if device.type == "cuda":
        how = f"device-to-device copy of {n_bytes >> 20} MiB (read + write), median of 20"
    else:
        how = (f"memcpy of {n_bytes >> 20} MiB with torch copy_ on {torch.get_num_threads()} "
               f"thread(s) (read + write), median of 20, timer "
               f"{'time.process_time' if cpu_time else 'time.perf_counter'}")
    return bw, how


def peak_memory_bytes(step, device: torch.device) -> tuple[Optional[int], str]:
    """Extra memory one call of ``step`` needs over what was allocated before it.

    Its results (y, the gradients) are counted; inputs, parameters and rotation buffers are
    not. GPU: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events of the
    PyTorch profiler (``profile_memory=True``), replayed in time order.
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, "torch.cuda.max_memory_allocated minus the allocation before the call"
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, "torch.profiler allocation events (profile_memory=True), running sum's maximum"


def rotation_count(bytes_per_set: int, device: torch.device) -> int:
    """How many input sets to rotate among so that together they overflow the last cache twice."""
    return int(min(32, max(2, math.ceil(2 * cache_bytes(device) / max(bytes_per_set, 1)))))


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
