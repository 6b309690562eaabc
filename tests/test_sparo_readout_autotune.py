"""Autotuning on the CPU: device-aware pruning (fake device properties), bucketed keys, pinned
configs, the on-disk cache and the cross-rank choice (fake timings, a real ``HashStore``)."""
import itertools
import importlib
import json
from types import SimpleNamespace

import pytest
import torch

at = importlib.import_module("sparo_fast_kernels.sparo_readout_autotune")

BENCH = {"vit_b32": (50, 768), "vit_b16": (197, 768), "text_b": (77, 512), "vit_l14": (257, 1024)}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _props(name="NVIDIA A10", major=8, minor=6, smem=99 * 1024, sms=72):
    return SimpleNamespace(name=name, major=major, minor=minor, shared_memory_per_block_optin=smem,
                           multi_processor_count=sms, regs_per_multiprocessor=65536, max_threads_per_block=1024)


def _spaces(N, D, dtype, L=64, A=64, V=64, M=256):
    """(kernel, meta, space) of every tuned kernel at one shape, for the limits now assumed."""
    return [("_fwd_fused_kernel", at.fused_meta(L, N, D, A, V, dtype), at.fused_space(L, N, D, A, V, dtype)),
            ("_bwd_fused_kernel", at.bwd_fused_meta(L, N, D, 1, A, L, A, V, M, dtype),
             at.bwd_fused_space(L, N, D, 1, A, L, A, V, M, dtype))]


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty on-disk cache, no pins, no choices, no process group."""
    monkeypatch.setenv("SPARO_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARO_FAST_CONFIG", raising=False)
    monkeypatch.setattr(at, "_store", lambda: None)
    at.forget()
    at._PINS.clear()
    yield tmp_path
    at.forget()
    at._PINS.clear()


@pytest.mark.parametrize("arch", sorted(at.ARCH_SMEM))
def test_every_space_fits_every_arch(arch):
    """Every benchmark shape and dtype has configs on every architecture, all estimated to fit."""
    lim = at.limits_for_arch(arch)
    with at.assume(lim):
        for N, D in BENCH.values():
            for dtype in DTYPES:
                for name, meta, space in _spaces(N, D, dtype):
                    assert space, (arch, N, dtype, name)
                    for cfg in space:
                        assert at.SMEM_ESTIMATES[name]({**meta, **cfg}, cfg, dtype) <= lim.smem, (arch, name, cfg)


def test_small_gpu_takes_the_tiled_backward():
    """vit_b16 in half precision: the one-tile backward needs > 99 kB; a 99 kB device (fake A10
    properties) gets the tiled path, an H100 keeps the one-tile path."""
    with at.assume(at.limits_from_props(_props())):
        assert at.bwd_meta(64, 197, 768, torch.bfloat16)["ONE_TILE"] is False
    with at.assume(at.limits_from_props(_props("NVIDIA H100", 9, 0, 227 * 1024, 132))):
        assert at.bwd_meta(64, 197, 768, torch.bfloat16)["ONE_TILE"] is True


def test_fallback_fits_99kb():
    """A device too small for every config gets the fallback, which fits the smallest GPUs."""
    tiny = at.DeviceLimits("tiny", 86, 1024)
    with at.assume(tiny):
        spaces = _spaces(197, 768, torch.bfloat16)
    for name, meta, space in spaces:
        assert 1 <= len(space) <= 2, name
        for cfg in space:
            assert at.SMEM_ESTIMATES[name]({**meta, **cfg}, cfg, torch.bfloat16) <= 99 * 1024, (name, cfg)


@pytest.mark.parametrize("arch", [80, 90, 100, 103, 120])
def test_item_calls_only_where_no_tensor_memory_is_used(arch):
    """The backward's items run as calls of non-inlined functions except where Triton cannot
    call them: products through tensor memory, half precision on sm_100/103 only."""
    with at.assume(at.limits_for_arch(arch)):
        assert at.item_calls(torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            assert at.item_calls(dtype) == (arch // 10 != 10), (arch, dtype)
    assert at.item_calls(torch.float16)  # no device (the interpreter): calls


def test_device_queried_lazily_once(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: calls.append(i) or _props())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(at, "_QUERIED", {})
    assert calls == []  # nothing at import or before the first space
    at.pool_space(64, 197, 768, torch.float16)
    at.bwd_space(64, 197, 768, torch.float16)
    assert calls == [0]
    assert at.device_limits().smem == 99 * 1024


def test_keys_bucket_n_and_m():
    named = dict(N=197, D=768, L=64, M=256 * 1)
    k197 = at.tune_key(at.pool_space, named, ["N", "D", "L"], (256, 768))
    assert k197 == at.tune_key(at.pool_space, dict(named, N=250), ["N", "D", "L"], (256, 768))
    assert k197 != at.tune_key(at.pool_space, dict(named, N=260), ["N", "D", "L"], (256, 768))
    km = at.tune_key(at.proj_space, named, ["M", "D"], ())
    assert km == at.tune_key(at.proj_space, dict(named, M=200), ["M", "D"], ())
    assert at.tune_key(at.proj_space, dict(named, M=8192), ["M", "D"], ()) == \
        at.tune_key(at.proj_space, dict(named, M=65536), ["M", "D"], ())


def _timer(times, calls):
    def bench(cfg):
        calls.append(cfg["BD"])
        return times[cfg["BD"]]
    return bench


SPACE = [dict(BD=64, num_warps=8, num_stages=2), dict(BD=32, num_warps=8, num_stages=2),
         dict(BD=16, num_warps=8, num_stages=1)]


def test_choose_times_once_then_caches_on_disk(fresh):
    calls = []
    cfg = at.choose("_fwd_pool_kernel", "k1", SPACE, _timer({64: 3.0, 32: 1.0, 16: 2.0}, calls))
    assert cfg["BD"] == 32 and sorted(calls) == [16, 32, 64]
    assert at.choose("_fwd_pool_kernel", "k1", SPACE, _timer({64: 0, 32: 9, 16: 9}, calls))["BD"] == 32
    assert len(calls) == 3  # not re-timed in this process
    at.forget()  # a new process: the disk cache answers
    assert at.choose("_fwd_pool_kernel", "k1", SPACE, None)["BD"] == 32
    files = list((fresh / "autotune").glob("*.json"))
    assert len(files) == 1 and "triton" in files[0].name and json.loads(files[0].read_text())["k1"]["BD"] == 32
    assert at.choose("_fwd_pool_kernel", "unknown", SPACE, None) is None  # tracing: nothing to time


def test_pins(fresh, monkeypatch):
    calls = []
    at.pin("bwd_token", BD=16, num_warps=8, num_stages=1)
    assert at.choose("_bwd_token_kernel", "k", SPACE, _timer({64: 1, 32: 1, 16: 1}, calls))["BD"] == 16
    at.pin("bwd_token")
    monkeypatch.setenv("SPARO_FAST_CONFIG", "_bwd_token_kernel:BD=64,num_warps=8,num_stages=2;fwd_pool:BD=32,"
                                            "num_warps=4,num_stages=3")
    assert at.choose("_bwd_token_kernel", "k", SPACE, None) == dict(BD=64, num_warps=8, num_stages=2)
    assert at.choose("_fwd_pool_kernel", "k", SPACE, None) == dict(BD=32, num_warps=4, num_stages=3)
    assert calls == []
    monkeypatch.setenv("SPARO_FAST_CONFIG", "bwd_token:BD=16")
    with pytest.raises(ValueError, match="SPARO_FAST_CONFIG"):
        at.choose("_bwd_token_kernel", "k", SPACE, None)
    with pytest.raises(ValueError, match="num_warps"):
        at.pin("bwd_token", BD=16)


def test_ranks_agree_without_waiting(fresh, monkeypatch):
    """Two ranks time differently; the first to publish wins and the second uses its config
    without timing; a rank alone on a new key tunes and publishes without waiting for anyone."""
    store = torch.distributed.HashStore()
    monkeypatch.setattr(at, "_store", lambda: store)
    first, second = [], []
    a = at.choose("_fwd_pool_kernel", "kr", SPACE, _timer({64: 1.0, 32: 2.0, 16: 3.0}, first))
    at.forget()
    monkeypatch.setenv("SPARO_FAST_CACHE_DIR", str(fresh / "other-node"))  # no shared disk
    b = at.choose("_fwd_pool_kernel", "kr", SPACE, _timer({64: 3.0, 32: 1.0, 16: 2.0}, second))
    assert a == b == SPACE[0] and len(first) == 3 and second == []
    # a rank that tuned before seeing the store (a race) still ends on the published choice
    at.forget()
    store.set("sparo_fast/autotune/kz", json.dumps(SPACE[2]))
    monkeypatch.setattr(at, "_published", lambda key, st: None)
    assert at.choose("_fwd_pool_kernel", "kz", SPACE, _timer({64: 1.0, 32: 2.0, 16: 3.0}, [])) == SPACE[2]


class _FakeKernel:
    """Stands for a ``triton.jit`` function: records launches."""
    arg_names = ["X", "N", "D", "L"]
    __name__ = "_fwd_pool_kernel"

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, args, kw))


def test_launch_uses_the_chosen_config(fresh, monkeypatch):
    """``launch`` times the space once per bucketed key (fake timings), then launches the winner
    with its meta-parameters, warps and stages, and a grid computed from them."""
    import torch.library

    k = _FakeKernel()
    monkeypatch.setattr(torch.library, "wrap_triton", lambda kern: kern)
    timed = []
    monkeypatch.setattr(at, "_bench_fn", lambda kern, grid, args, meta: _timer({64: 2.0, 32: 1.0, 16: 3.0}, timed))
    x = torch.empty(2, 3)
    for n in (197, 200):  # same N bucket: timed once
        at.launch(k, lambda m: (m["BD"], 1), (x, n, 768, 64), dict(ONE_TILE=True), SPACE, ["N", "D", "L"], ("t",))
    assert sorted(timed) == [16, 32, 64]
    assert [(g, kw) for g, _, kw in k.launches] == [((32, 1), dict(ONE_TILE=True, BD=32, num_warps=8, num_stages=2))] * 2


def test_timing_runs_rezero_work_counters(fresh, monkeypatch):
    """A persistent kernel's work counter (``RESET_ARGS``) is zero before every timing run and
    after the last one: the real launch that follows tuning finds every ticket free."""
    import triton.testing

    seen = []

    class _Counting(_FakeKernel):
        arg_names = ["SYNC", "N", "D", "L"]
        __name__ = "_fwd_fused_kernel"

        def __getitem__(self, grid):
            def run(*args, **kw):
                seen.append(int(args[0][0]))
                args[0][0] += 5  # the launch takes tickets
            return run

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), fn(), 1.0)[-1])
    sync = torch.zeros(1, dtype=torch.int32)
    bench = at._bench_fn(_Counting(), (1,), (sync, 197, 768, 64), {})
    for cfg in SPACE:
        bench(cfg)
    assert seen == [0] * (3 * len(SPACE)) and int(sync[0]) == 0  # a first run compiles, two timed


def test_choose_skips_configs_that_spill(fresh, monkeypatch):
    """Tuning reads each config's ``n_spills`` from its compiled kernel (on the GPU at hand) and
    picks the fastest spill-free config; the fastest of all only when every one spilled."""
    import triton.testing

    spills = {64: 16, 32: 0, 16: 0}

    class _Spilling(_FakeKernel):
        def __getitem__(self, grid):
            return lambda *args, **kw: SimpleNamespace(n_spills=spills[kw["BD"]])

    times = itertools.cycle([1.0, 2.0, 3.0])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), next(times))[-1])
    bench = at._bench_fn(_Spilling(), (1,), (torch.empty(1), 197, 768, 64), {})
    assert [bench(c) for c in SPACE] == [(True, 1.0), (False, 2.0), (False, 3.0)]
    assert at.choose("_fwd_fused_kernel", "sp", SPACE, bench)["BD"] == 32  # BD 64 is faster but spills
    spills.update({32: 4, 16: 8})
    assert at.choose("_fwd_fused_kernel", "sp2", SPACE, bench)["BD"] == 64  # all spill: the fastest


def test_program_share_is_timed_once_per_key(fresh, monkeypatch):
    """On a GPU a persistent launch (the backward's owners, the fused forward's programs) times
    the whole launch at 100%, 67%, 50%, 33% and 25% of one program per SM once per key (fake
    timings: 89 fastest) and keeps the choice; the interpreter and an unknown key while tracing
    take the default (the largest count whose samples in flight fit 80% of the L2), a forced
    count is taken as it is."""
    op = importlib.import_module("sparo_fast_kernels.sparo_readout_op")
    assert [at.owners(132, c) for c in at.owner_space()] == [132, 89, 66, 44, 33]
    # bytes per sample: 132 x 300k, 66 x 600k, 44 x 900k and 33 x 1.1M fit 40 of 50 MB; 89 x 600k,
    # 66 x 900k and 44 x 1.1M do not; nothing fits 6 MB a sample: the smallest choice
    small, big = 300_000, 600_000
    sizes = (small, big, 900_000, 1_100_000, 10 * big)
    assert [at.default_owners(132, b, 50_000_000) for b in sizes] == [132, 66, 44, 33, 33]
    x = torch.empty(4)
    ran = []

    def run(p):
        ran.append(p)
        return p

    monkeypatch.setattr(op, "_time", lambda fn: {132: 3.0, 89: 1.0, 66: 2.0, 44: 4.0, 33: 5.0}[fn()])
    monkeypatch.setattr(op, "INTERPRETED", True)
    for kind in ("bwd_owners", "fwd_programs"):
        assert op._program_share(kind, 132, run, (x,), ("t",), big) == 66  # the interpreter: the default
        assert op._program_share(kind, 132, run, (x,), ("t",), small) == 132 and ran == []
    monkeypatch.setattr(op, "INTERPRETED", False)
    for kind in ("bwd_owners", "fwd_programs"):  # one choice per kind and key
        share = lambda *a, **k: op._program_share(kind, *a, **k)  # noqa: E731
        n = len(ran)
        assert share(132, run, (x,), ("t",), big) == 89 and sorted(ran[n:]) == [33, 44, 66, 89, 132]
        assert share(132, run, (x,), ("t",), big) == 89 and len(ran) == n + 5  # cached
        assert share(1, run, (x,), ("u",), big) == 1 and len(ran) == n + 5  # one program: nothing to choose
        assert share(7, run, (x,), ("w",), big, forced=True) == 7 and len(ran) == n + 5  # forced by a test or a count
    monkeypatch.setattr(at, "_tracing", lambda args: True)
    assert op._program_share("bwd_owners", 132, run, (x,), ("v",), big) == 66 and len(ran) == 10  # tracing
