"""The L2-aware count (bench/l2_cache.py, bench/l2_stream.py, kernels/testing/access_stream.py):
exact on kernels of known reuse, wave interleaving that changes the count, a sampled recording
of the real read-out equal to a full one, and the compiled cache loop equal to the Python one."""
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the access streams come from the Triton CPU interpreter")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import l2_cache  # noqa: E402
import l2_stream  # noqa: E402
import sparo_readout_bench as sb  # noqa: E402
import traffic  # noqa: E402
from sparo_fast_kernels.testing import access_stream as st  # noqa: E402

LINE = l2_cache.LINE


@triton.jit
def _sweep_twice_kernel(X, Y, n, BLOCK: tl.constexpr):
    """One program: sums x over two full sweeps (the second re-reads what the first read)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sweep in range(2):
        for start in range(0, n, BLOCK):
            acc += tl.load(X + start + tl.arange(0, BLOCK))
    tl.store(Y + tl.arange(0, BLOCK), acc)


@triton.jit
def _sweep_twice_hinted_kernel(X, Y, n, KEEP: tl.constexpr, BLOCK: tl.constexpr):
    """As ``_sweep_twice_kernel``, the first KEEP elements loaded with evict_last."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sweep in range(2):
        for start in range(0, n, BLOCK):
            if start < KEEP:
                acc += tl.load(X + start + tl.arange(0, BLOCK), eviction_policy="evict_last")
            else:
                acc += tl.load(X + start + tl.arange(0, BLOCK))
    tl.store(Y + tl.arange(0, BLOCK), acc)


@triton.jit
def _reuse_after_kernel(X, Z, Y, BX: tl.constexpr, BZ: tl.constexpr):
    """Program p: reads its x block, then its own z block, then its x block again."""
    p = tl.program_id(0)
    a = tl.load(X + p * BX + tl.arange(0, BX))
    b = tl.load(Z + p * BZ + tl.arange(0, BZ))
    c = tl.load(X + p * BX + tl.arange(0, BX))
    tl.store(Y + p * BX + tl.arange(0, BX), a + c + tl.sum(b))


def _dram(launch_fn, cache_lines: int, resident: int, sample: bool = False) -> dict:
    space = st.AddressSpace()
    rec = st.StreamRecorder(space, sample=sample, full_below=2)
    with l2_stream.recording(rec):
        launch_fn()
    streams = [st.interleave(k, resident) for k in rec.launches]
    return l2_stream.simulate(streams, cache_lines * LINE, space=space)


@pytest.mark.parametrize("lines_x,expect_second_sweep_hits", [(48, True), (80, False)])
def test_second_sweep_hits_iff_the_buffer_fits(lines_x, expect_second_sweep_hits):
    """x of 48 lines + 1 output line fit a 64-line LRU: x is read from DRAM once; x of 80 lines
    does not: sequential LRU sweeps evict every line before its reuse, x is read twice."""
    block = LINE // 4  # one float32 line per load
    x, y = torch.randn(lines_x * block), torch.empty(block)
    r = _dram(lambda: _sweep_twice_kernel[(1,)](x, y, x.numel(), BLOCK=block), cache_lines=64, resident=1)
    reads = lines_x * (1 if expect_second_sweep_hits else 2)
    assert r["dram"] == (reads + 1) * LINE  # + y, written back at the end
    assert r["flush"] == LINE
    assert r["per_launch"][0]["read"] == reads * LINE


def test_evict_last_keeps_the_hinted_lines():
    """x of 80 lines, 64-line cache, the first 48 lines loaded with evict_last: they survive the
    sweep and hit in the second; the other 32 share 16 lines, LRU, and miss again: 112 reads."""
    block = LINE // 4
    x, y = torch.randn(80 * block), torch.empty(block)
    r = _dram(lambda: _sweep_twice_hinted_kernel[(1,)](x, y, x.numel(), KEEP=48 * block, BLOCK=block),
              cache_lines=64, resident=1)
    assert r["per_launch"][0]["read"] == (80 + 32) * LINE and r["dram"] == (80 + 32 + 1) * LINE


def test_wave_interleaving_decides_the_hit():
    """8 programs each read 4 x-lines, 16 z-lines, the same 4 x-lines; 64-line cache. One at a
    time: a program's 20 lines fit, its second x read hits. All 8 resident, round-robin by
    access: 8 x 4 + 8 x 16 lines come between the two x reads, every second read misses."""
    bx, bz = 4 * LINE // 4, 16 * LINE // 4
    x, z, y = torch.randn(8 * bx), torch.randn(8 * bz), torch.empty(8 * bx)
    run = (lambda: _reuse_after_kernel[(8,)](x, z, y, BX=bx, BZ=bz))
    one = _dram(run, cache_lines=64, resident=1)
    eight = _dram(run, cache_lines=64, resident=8)
    assert one["per_launch"][0]["read"] == 8 * (4 + 16) * LINE
    assert eight["per_launch"][0]["read"] == 8 * (4 + 16 + 4) * LINE
    # y (32 lines) is written either way: evicted dirty or left dirty at the end
    assert one["dram"] - one["per_launch"][0]["read"] == eight["dram"] - eight["per_launch"][0]["read"] == 32 * LINE
    # the sampled recording (3 of 8 programs run, the rest translated) gives the same streams
    sampled = _dram(run, cache_lines=64, resident=8, sample=True)
    assert sampled == eight
    # per buffer: the re-read is x's, the write-backs y's (evicted by the cache of 64 lines, or flushed)
    rows = {r["buffer"]: r for r in eight["by_buffer"]}
    k = "_reuse_after_kernel"
    assert set(rows) == {f"{k}:X", f"{k}:Z", f"{k}:Y"}
    assert (rows[f"{k}:X"]["read"], rows[f"{k}:Z"]["read"], rows[f"{k}:Y"]["read"]) == (2 * 32 * LINE, 8 * 16 * LINE, 0)
    assert rows[f"{k}:Y"]["writeback"] + rows[f"{k}:Y"]["flush"] == 32 * LINE == rows[f"{k}:Y"]["size"]
    assert rows[f"{k}:X"]["writeback"] == rows[f"{k}:X"]["flush"] == 0
    assert {r["buffer"]: r["read"] for r in one["by_buffer"]}[f"{k}:X"] == 32 * LINE


def _streams(shape, pass_, batch, programs, sample):
    space = st.AddressSpace()
    rec = st.StreamRecorder(space, sample=sample, full_below=2)
    events = traffic.count(shape, "triton", pass_, batch, programs=programs, space=space,
                           extra=lambda: l2_stream.recording(rec))
    return rec, l2_stream.pass_streams(events, rec, resident=3)


def test_sampled_recording_of_the_readout_equals_the_full_one():
    """Tiny read-out, forward + backward, B = 23 on 9 backward programs (programs 0-4 take 3
    samples, 5-8 take 2: a segment boundary): every launch's interleaved line stream from a few
    recorded programs equals the one from running every program."""
    shape = sb.Shape("tiny", 23, 9, 32, True)
    full_rec, full = _streams(shape, "fwd_bwd", 23, 9, sample=False)
    samp_rec, samp = _streams(shape, "fwd_bwd", 23, 9, sample=True)
    assert [k.kernel for k in full_rec.launches] == [k.kernel for k in samp_rec.launches]
    assert len(full) == len(samp) > len(full_rec.launches)  # the PyTorch ops are in the stream too
    for (a, ka), (b, kb) in zip(full, samp):
        assert np.array_equal(a, b) and np.array_equal(ka, kb)
    assert sum(k.recorded for k in samp_rec.launches) < sum(len(k.programs) for k in samp_rec.launches)
    token = [k for k in samp_rec.launches if k.kernel == "_bwd_fused_kernel"][0]
    assert token.blocks >= 2 and token.recorded < len(token.programs)


@pytest.mark.skipif(l2_cache.native() is None, reason="no C compiler: only the Python loop exists")
@pytest.mark.parametrize("ways", [None, 4])
def test_compiled_and_python_caches_agree(ways):
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    rng = np.random.default_rng(seed)
    lines = rng.integers(0, 700, 30000)
    kinds = (rng.integers(0, 3, 30000) | rng.choice([0, 4, 8], 30000) | (rng.integers(0, 16, 30000) << 4)).astype(np.uint8)
    a, b = l2_cache.L2(512 * LINE, ways), l2_cache.L2(512 * LINE, ways, use_native=False)
    for part in np.array_split(np.arange(lines.size), 3):  # state carries over between calls
        ra, rb = a.access(lines[part], kinds[part]), b.access(lines[part], kinds[part])
        assert all(np.array_equal(u, v) for u, v in zip(ra, rb))
    assert all(np.array_equal(u, v) for u, v in zip(a.dirty_sectors(), b.dirty_sectors()))
    assert a.resident_lines() == b.resident_lines() == 512


def test_lru_policy_by_hand():
    """Two-line cache: load 1, load 2 (misses); store 3 (no read; evicts 1, clean); load 1 (miss,
    evicts 2); load 3 (hit); atomic 4 (read on the miss, evicts 1); load 5 (miss, evicts the dirty
    3: one write-back, of line 3); left dirty: 4."""
    for native in (True, False):
        c = l2_cache.L2(2 * LINE, use_native=native)
        miss, wb, wbn = c.access(np.array([1, 2, 3, 1, 3, 4, 5]), np.array([0, 0, 1, 0, 0, 2, 0], np.uint8))
        assert miss.tolist() == [4, 4, 0, 4, 0, 4, 4]  # whole lines: 4 sectors each
        assert wb.tolist() == [-1] * 6 + [3] and wbn.tolist() == [0] * 6 + [4]
        assert [a.tolist() for a in c.dirty_sectors()] == [[4], [4]] and c.resident_lines() == 2


def test_sectors_are_read_and_written_back_as_touched():
    """One-line cache, accesses of half a line (two 32-byte sectors): load the low half of line 1
    (2 sectors read), its high half (2 more), both again (none); store the low half of line 2
    (evicts the clean line 1, reads nothing); load the whole of line 2 (reads the 2 sectors not
    written); load line 3 (evicts line 2: 2 dirty sectors written back)."""
    lo, hi = 0b0011 << 4, 0b1100 << 4
    for native in (True, False):
        c = l2_cache.L2(LINE, use_native=native)
        miss, wb, wbn = c.access(np.array([1, 1, 1, 2, 2, 3]), np.array([lo, hi, 0, 1 | lo, 0, 0], np.uint8))
        assert miss.tolist() == [2, 2, 0, 0, 2, 4]
        assert wb.tolist() == [-1] * 5 + [2] and wbn.tolist() == [0] * 5 + [2]
    x = torch.zeros(4 * LINE // 2, dtype=torch.float16)
    block = 32 // 2  # one 32-byte sector per access, each line touched by four accesses
    y = torch.empty(block, dtype=torch.float16)
    r = _dram(lambda: _sweep_twice_kernel[(1,)](x, y, x.numel(), BLOCK=block), cache_lines=2, resident=1)
    assert r["per_launch"][0]["read"] == 2 * 4 * LINE  # 4 lines > 2: both sweeps miss, each sector once a sweep
    assert r["flush"] == 32  # y: one dirty sector


def test_sizes_parse_and_reject_bad_input():
    assert l2_cache.parse_size("50MB") == 50_000_000 and l2_cache.parse_size("40MiB") == 40 * 2**20
    with pytest.raises(ValueError, match="L2 size"):
        l2_cache.parse_size("fifty")


def test_op_streams_read_each_line_of_a_view_once():
    """A PyTorch op's stream: the lines of its inputs' distinct elements (a dense transpose: the
    whole span; a column slice: only the rows' first halves; a broadcast: the row once), then its
    outputs' lines as stores."""
    a = torch.randn(64, 64)  # 256-byte rows: 2 lines each (the address space aligns storages)
    space = st.AddressSpace()
    lines, kinds = l2_stream.op_lines(space, [a.t(), a[:, :32], a[0].expand(5, 64)], [torch.empty(64, 32)])
    n_in = 128 + 64 + 2
    assert lines.size == n_in + 64 and (kinds[:n_in] == l2_cache.LOAD).all() and (kinds[n_in:] == l2_cache.STORE).all()
    assert np.unique(lines[128:192]).size == 64 and np.all(np.diff(lines[128:192]) == 2)  # every other line
    assert set(lines[192:194].tolist()) <= set(lines[:128].tolist())  # the same storage, the same lines
