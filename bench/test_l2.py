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
from sparo_fast_kernels.sparo_readout_common import _discard_span  # noqa: E402
from sparo_fast_kernels.testing import access_stream as st  # noqa: E402
from sparo_fast_kernels.testing import interpreter_trace as trace  # noqa: E402

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


@triton.jit
def _count_runs_kernel(RUNS, Y, BLOCK: tl.constexpr):
    """Program p: adds one to RUNS[p] (how often the interpreter ran it) and writes its y block."""
    p = tl.program_id(0)
    tl.atomic_add(RUNS + p, 1)
    tl.store(Y + p * BLOCK + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))


@triton.jit
def _producer_consumer_kernel(BUF, OUT, BLOCK: tl.constexpr):
    """Programs 0-3 write buffer blocks 0-3; 4 and 5 sum blocks 0, 1 and 2, 3; 6 copies block 7,
    which 7 (later) writes and then reads back."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if p < 4:
        tl.store(BUF + p * BLOCK + offs, offs.to(tl.float32))
    elif p < 6:
        q = 2 * (p - 4)
        tl.store(OUT + p * BLOCK + offs, tl.load(BUF + q * BLOCK + offs) + tl.load(BUF + (q + 1) * BLOCK + offs))
    elif p == 6:
        tl.store(OUT + p * BLOCK + offs, tl.load(BUF + 7 * BLOCK + offs))
    else:
        tl.store(BUF + 7 * BLOCK + offs, offs.to(tl.float32))
        tl.store(OUT + p * BLOCK + offs, tl.load(BUF + 7 * BLOCK + offs))


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


def test_a_sampled_launch_runs_each_chosen_program_once():
    """The sampler is asked for a launch's first programs before the launch is announced; those
    programs run once (a recorder that reset its plan when the launch began ran them twice, and a
    persistent kernel's second run found its tickets taken)."""
    for launches in range(1, 3):  # the state left by one launch does not leak into the next
        space = st.AddressSpace()
        rec = st.StreamRecorder(space, sample=True, full_below=2)
        runs, y = torch.zeros(40, dtype=torch.int32), torch.empty(40 * 32)
        with l2_stream.recording(rec):
            for _ in range(launches):
                _count_runs_kernel[(40,)](runs, y, BLOCK=32)
        ran = runs > 0
        assert int(runs.max()) == launches and int(runs[ran].min()) == launches
        assert [k.recorded for k in rec.launches] == [int(ran.sum())] * launches and int(ran.sum()) < 40


def _infer_items(sample: bool):
    """The inference kernel on a tiny read-out, 7 samples in chunks of 2 (ring of 2 chunks, 4
    chunks: every kind of wait), recorded and split into its ticketed items."""
    from sparo_fast_kernels import sparo_readout_infer as inf
    g = torch.Generator().manual_seed(0)
    B, N, D, L, H, vd, V = 7, 16, 32, 8, 2, 4, 16
    args = [torch.randn(*s, generator=g).half() for s in ((B, N, D), (L, D), (H * vd, D), (H * vd,), (V, vd), (V,))]
    space = st.AddressSpace()
    rec = st.StreamRecorder(space, sample=sample, ticketed={
        "_infer_kernel": st.Tickets("SYNC", inf.SYNC_TICKET, inf.SYNC_ERROR)})
    old = dict(inf.META_OVERRIDE)
    inf.META_OVERRIDE.update(G=2, LOOK=1)
    try:
        with l2_stream.recording(rec):
            inf.launch_infer(args[0], None, *args[1:], H, 0.1, False)
    finally:
        inf.META_OVERRIDE.clear()
        inf.META_OVERRIDE.update(old)
    return rec.launches[0]


def test_a_ticketed_kernel_is_split_into_its_items_in_ticket_order():
    """Items: 2 pools of chunk 0, then per chunk c its 2 projections and the 2 pools of chunk
    c + 1 (LOOK * G + C * (H + G) = 18, the last chunk's pools no-ops), then each of the two
    interpreted programs' ticket past the end. A projection waits for its chunk's pools; the pools
    of chunk c > 1 for the projections of chunk c - 2 (the previous user of their ring chunk)."""
    k = _infer_items(sample=False)
    assert k.grid == (20, 1, 1) and len(k.programs) == 20
    proj, pools = {0: [2, 3], 1: [6, 7], 2: [10, 11], 3: [14, 15]}, {0: [0, 1], 1: [4, 5], 2: [8, 9], 3: [12]}
    expect = [[] for _ in range(20)]
    for c, items in proj.items():
        for i in items:
            expect[i] = pools[c]
    for c in (2, 3):
        for i in pools[c]:
            expect[i] = proj[c - 2]
    assert k.after == expect
    assert [p.kinds.size for p in k.programs].count(1) == 5  # sample 7 (no such), chunk 4's pools, 2 ends
    sampled = _infer_items(sample=True)
    assert sampled.after == k.after and all(st.same(a, b) for a, b in zip(k.programs, sampled.programs))


def test_an_item_starts_after_the_items_it_waits_for():
    """Scheduled on 8 slots, every item that waits starts after the last step of the items it
    waits for, though a slot was free earlier (without the waits the projections of chunk 0
    would start with the pools they read); the interleaved stream holds every access's lines."""
    k = _infer_items(sample=False)
    waits = [i for i in range(20) if k.after[i]]
    streams = []
    for after in (k.after, None):
        run = st.LaunchStream(k.kernel, k.grid, k.programs, k.recorded, after=after)
        t0, _ = st.schedule(run, 8)
        end = t0 + np.array([p.kinds.size for p in k.programs])
        late = [bool(t0[i] >= end[k.after[i]].max()) for i in waits]
        assert all(late) if after is not None else not any(late[:2])
        streams.append(st.interleave(run, 8))
    assert t0[2] == t0[3] == 0  # without the waits: a free slot at once
    (a, ka), (b, kb) = streams  # the same accesses, in another order
    assert not np.array_equal(a, b)
    assert sorted(zip(a.tolist(), ka.tolist())) == sorted(zip(b.tolist(), kb.tolist()))


def test_waits_are_the_same_whatever_the_chunk_of_pairs():
    """The (reader, earlier writer) pairs formed a chunk at a time equal those formed at once, on
    random blocks (some with no earlier writer, some written by many items)."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print("seed", seed)
    rng = np.random.default_rng(seed)
    for _ in range(50):
        m, k = int(rng.integers(1, 40)), int(rng.integers(1, 30))
        wi, ri = np.sort(rng.integers(0, 30, m)), rng.integers(0, 30, k)
        lo = rng.integers(0, m, k)
        n = np.minimum(rng.integers(1, 6, k), m - lo)
        w, r = wi[st.ranges(lo, n)], np.repeat(ri, n)
        want = {(int(a), int(b)) for a, b in zip(r, w) if b < a}
        for chunk in (1, 3, 7, 1 << 24):
            got = st._writer_pairs(wi, ri, lo, n, chunk)
            assert sorted(want) == [tuple(p) for p in got.tolist()], chunk


def test_work_items_wait_for_the_items_whose_stores_they_load():
    """A kernel run one program per work item in work order: an item waits for the earlier items
    whose stores it loads (4 for 0 and 1, 5 for 2 and 3), not for a later writer (6 reads what 7
    writes after it) nor for itself (7); sampled or not, and only for the kernels named."""
    block = 32
    buf, out = torch.zeros(8 * block), torch.zeros(8 * block)
    for sample in (False, True):
        rec = st.StreamRecorder(st.AddressSpace(), sample=sample, full_below=2,
                                item_kernels=("_producer_consumer_kernel",))
        with l2_stream.recording(rec):
            _producer_consumer_kernel[(8,)](buf, out, BLOCK=block)
        assert rec.launches[0].after == [[], [], [], [], [0, 1], [2, 3], [], []]
    rec = st.StreamRecorder(st.AddressSpace())
    with l2_stream.recording(rec):
        _producer_consumer_kernel[(8,)](buf, out, BLOCK=block)
    assert rec.launches[0].after is None
    t0, _ = st.schedule(rec.launches[0], 8)
    assert t0.tolist() == [0] * 8
    waited = st.LaunchStream(rec.launches[0].kernel, (8, 1, 1), rec.launches[0].programs, 8,
                             after=st.data_waits(rec.launches[0].programs))
    t0, _ = st.schedule(waited, 8)
    assert t0[4] == t0[5] == 1 and t0[6] == t0[7] == 0  # a producer is one store long


@pytest.mark.skipif(l2_cache.native() is None, reason="no C compiler: only the Python loop exists")
@pytest.mark.parametrize("ways", [None, 4])
def test_compiled_and_python_caches_agree(ways):
    seed = int(torch.randint(0, 2**31, ()).item())
    print("seed", seed)
    rng = np.random.default_rng(seed)
    lines = rng.integers(0, 700, 30000)
    kinds = (rng.integers(0, 4, 30000) | rng.choice([0, 4, 8], 30000) | (rng.integers(0, 16, 30000) << 4)).astype(np.uint8)
    a, b = l2_cache.L2(512 * LINE, ways), l2_cache.L2(512 * LINE, ways, use_native=False)
    for part in np.array_split(np.arange(lines.size), 3):  # state carries over between calls
        ra, rb = a.access(lines[part], kinds[part]), b.access(lines[part], kinds[part])
        assert all(np.array_equal(u, v) for u, v in zip(ra, rb))
    assert all(np.array_equal(u, v) for u, v in zip(a.dirty_sectors(), b.dirty_sectors()))
    assert a.resident_lines() == b.resident_lines() <= 512  # discards free lines


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


def test_a_discard_drops_a_line_without_writing_it_back():
    """Two-line cache: store 1 (dirty), discard 1 (gone, nothing written), load 2 and 3 (both fit:
    nothing evicted), discard 4 (absent: nothing), load 1 (read again: a miss, evicting the clean 2);
    left dirty: none."""
    for native in (True, False):
        c = l2_cache.L2(2 * LINE, use_native=native)
        D = l2_cache.DISCARD
        miss, wb, wbn = c.access(np.array([1, 1, 2, 3, 4, 1]), np.array([1, D, 0, 0, D, 0], np.uint8))
        assert miss.tolist() == [0, 0, 4, 4, 0, 4] and wb.tolist() == [-1] * 6 and wbn.tolist() == [0] * 6
        assert c.dirty_sectors()[0].size == 0 and c.resident_lines() == 2
    for ways in (None, 2):  # a discarded line frees its way: the next line takes it, nothing is evicted
        c = l2_cache.L2(2 * LINE, ways, use_native=l2_cache.native() is not None)
        miss, wb, _ = c.access(np.array([2, 4, 2, 6]), np.array([1, 0, l2_cache.DISCARD, 0], np.uint8))
        assert wb.tolist() == [-1] * 4 and c.dirty_sectors()[0].tolist() == []


@triton.jit
def _scratch_kernel(X, SCR, Y, n, DISCARD: tl.constexpr, BLOCK: tl.constexpr):
    """Copies x into a scratch, reads the scratch back into y, then discards the scratch."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        tl.store(SCR + start + offs, tl.load(X + start + offs))
    for start in range(0, n, BLOCK):
        tl.store(Y + start + offs, tl.load(SCR + start + offs))
    _discard_span(SCR, n, DISCARD)


def test_a_discarded_scratch_is_not_written_back():
    """x, scratch and y of 8 lines each in a 64-line cache: without the discard the scratch's 8
    dirty lines are written back with y's; with it only y's are. A discard moves no bytes: the
    requested and distinct byte counts are the same either way."""
    block = LINE // 4
    x, scr, y = torch.randn(8 * block), torch.empty(8 * block), torch.empty(8 * block)
    counts = []
    for discard in (False, True):
        def run():
            _scratch_kernel[(1,)](x, scr, y, x.numel(), DISCARD=discard, BLOCK=block)
        r = _dram(run, cache_lines=64, resident=1)
        assert r["flush"] == (8 if discard else 16) * LINE and r["dram"] == 8 * LINE + r["flush"]
        assert torch.equal(y, x)
        with trace.listening(trace.Recorder()) as rec:
            run()
        counts.append((rec.launches[0].requested_bytes, rec.launches[0].distinct_bytes))
    assert counts[0] == counts[1] == (4 * 8 * LINE, 3 * 8 * LINE)


def test_the_readout_discards_only_dead_scratch():
    """The backward's gxp rows, dqt partials and tiled scratch, the forward's tiled scores and the
    inference ring are dropped from L2 after their last read: every discard is a whole line of one
    of those buffers (offset a multiple of 128 bytes into its storage), and no line is loaded
    between its discard and a store to it, in any launch of the pass."""
    one_tile, tiled = sb.Shape("one_tile", 3, 20, 128, True), sb.Shape("tiled", 2, 260, 64, False)
    seen = {}
    for shape, pass_ in ((one_tile, "fwd_bwd"), (one_tile, "infer"), (tiled, "fwd_bwd")):
        watch = _DeadLines()
        traffic.count(shape, "triton", pass_, shape.B, programs=2, extra=lambda: trace.listening(watch))
        assert watch.loads_of_dead == 0, (shape.name, pass_)
        seen[shape.name, pass_] = watch.buffers
    bwd, fwd = "_bwd_fused_kernel", "_fwd_fused_kernel"
    assert seen == {("one_tile", "fwd_bwd"): {(bwd, "GXP"), (bwd, "DQT")},
                    ("one_tile", "infer"): {("_infer_kernel", "RING")},
                    ("tiled", "fwd_bwd"): {(bwd, "GXP"), (bwd, "DQT"), (bwd, "SCR"), (fwd, "SCR")}}


class _DeadLines(trace._Listener):
    """Lines by (storage, offset // 128): discarded ones, and loads of them before a store."""

    def __init__(self):
        self.dead, self.buffers, self.loads_of_dead = set(), set(), 0

    def access(self, launch, kind, addrs, itemsize):
        lines = set()
        for ad in np.unique(addrs.astype(np.int64)).tolist():
            a = next(a for a in launch.args if a.lo <= ad < a.hi)
            off = a.base - a.storage.data_ptr() + ad - a.lo
            if kind == "discard":
                assert off % LINE == 0 and ad + LINE <= a.hi, (launch.kernel, a.name, off)
                self.buffers.add((launch.kernel, a.name))
            lines.add((a.storage.data_ptr(), off // LINE))
        if kind == "discard":
            self.dead |= lines
        elif kind == "store":
            self.dead -= lines
        else:
            self.loads_of_dead += len(lines & self.dead)


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
