"""The inference path: ``SparoReadout`` in ``eval()`` where autograd records nothing.

* the fused inference kernel (``sparo_readout_infer``) against the float64 reference, outputs and
  attention maps, fp16 and fp32, with ``tests/accuracy.py``'s criterion, on one ring chunk and on
  a small ring that is reused several times (``META_OVERRIDE``); the op against its ``*_ref``;
* the absorbed-query cache: reused while the weights are unchanged, recomputed after an
  optimizer step, ``load_state_dict``, an in-place edit, ``.to()``; never consulted where
  gradients are needed; ``train()``/``eval()`` switching; gradient-accumulation micro-steps with
  an evaluation between them.

Without a GPU the kernels run under the Triton interpreter (``conftest.py``), on tiny shapes.
"""
from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from accuracy import absorbed_from_lse, assert_close, module_lengths, readout_lengths
from sparo_fast import SparoReadout, sparo_absorbed, sparo_reference
from sparo_fast import sparo_readout_triton as triton_backend
from sparo_fast.params import ReadoutParams

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_backend.is_available(DEV), reason="needs Triton (GPU or interpreter)")
infer = pytest.importorskip("sparo_fast_kernels.sparo_readout_infer")
trace = pytest.importorskip("sparo_fast_kernels.testing.interpreter_trace")
INTERPRETED = infer.INTERPRETED

SEED = 20241
D, L, V, A, H = 40, 4, 6, 8, 2  # two heads of two slots: the head-major ring layout matters


def _module(dtype, seed=SEED, share_kv=True) -> SparoReadout:
    print(f"seed {seed}")
    torch.manual_seed(seed)
    m = SparoReadout(D, L, V, A, num_heads=H, share_kv=share_kv, backend="triton", need_weights=True)
    with torch.no_grad():
        m.proj.bias.normal_()  # non-zero biases: a wrong bias row would show
        m.v.bias.normal_()
    return m.to(DEV, dtype)


def _inputs(dtype, B, N, eos: bool, seed=SEED):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, N, D, generator=gen).to(DEV, dtype)
    e = torch.randint(0, N, (B,), generator=gen).to(DEV) if eos else None
    return x, e


def _kernels(fn):
    """(result of fn(), names of the Triton launches it made): interpreter only."""
    rec = trace.Recorder()
    with trace.listening(rec):
        out = fn()
    return out, [r.kernel for r in rec.launches]


@pytest.fixture
def small_ring():
    """Two samples per chunk, two ring chunks: a batch of 7 reuses each ring chunk twice."""
    infer.META_OVERRIDE.update(G=2, LOOK=1)
    yield
    infer.META_OVERRIDE.clear()


# ----------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("ring", ["one_chunk", "small_ring"])
@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_infer_vs_float64(dtype, eos, ring, request):
    if ring == "small_ring":
        request.getfixturevalue("small_ring")
    m = _module(dtype).eval()
    x, e = _inputs(dtype, 7, 13, eos)
    with torch.no_grad():
        (out, attn), names = _kernels(lambda: m(x, e))
    if INTERPRETED:
        assert names == ["_infer_kernel"], names  # the fused kernel, not the training forward
    ps = m.params()
    wide = ReadoutParams(*(p.double() for p in ps))
    truth = sparo_reference(x.double(), e, wide)
    with torch.no_grad():
        own = [fn(x, e, ps) for fn in (sparo_reference, sparo_absorbed, absorbed_from_lse)]
    ks = module_lengths(m, x)
    assert out.dtype == attn.dtype == dtype
    assert_close("out", out, truth[0], tuple(o[0] for o in own), dtype=dtype, K=ks["out"], seed=SEED)
    assert_close("attn", attn, truth[1], tuple(o[1] for o in own), dtype=dtype, K=ks["attn"], seed=SEED)
    with torch.no_grad():
        out2, none = m(x, e, need_weights=False)
    assert none is None and torch.equal(out2, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_vs_ref(dtype, small_ring):
    """``readout_infer`` against ``readout_infer_ref`` (float64 truth; the ref at the kernel's
    precision is PyTorch's own error), separate k/v weights, three slots per head."""
    print(f"seed {SEED}")
    gen = torch.Generator().manual_seed(SEED)
    B, N, Dx, Hh, S, Vd, Vo = 5, 11, 24, 2, 3, 7, 5

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEV, dtype)

    x = r(N, B, Dx).permute(1, 0, 2)  # sequence-first storage: strided x
    args = [x, torch.tensor([10, 0, 4, 7, 2], device=DEV), r(Hh * S, Dx, scale=0.5),
            r(Hh * Vd, Dx, scale=Dx ** -0.5), r(Hh * Vd), r(Vo, Vd, scale=Vd ** -0.5), r(Vo), Hh, 0.4, True]
    got = torch.ops.sparo_fast.readout_infer(*args)
    lo = infer.readout_infer_ref(*args)
    truth = infer.readout_infer_ref(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                      for a in args])
    ks = readout_lengths(B, N, Dx, Hh * S, S, 8, Vd, Vo)
    for name, g, t, own in zip(("out", "attn"), got, truth, lo):
        assert_close(name, g, t, own, dtype=dtype, K=ks[name], seed=SEED)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter: -inf - -inf
def test_sample_without_valid_tokens_is_nan_alone(small_ring):
    """``eos < 0`` with input checks off: that sample's rows are NaN (as torch.softmax gives the
    torch backend), and the NaN stays in its own rows of the shared ring chunk and projection."""
    m = _module(torch.float32).eval()
    m.check_inputs = False
    ref = _module(torch.float32).eval()
    ref.backend, ref.check_inputs = "torch", False
    x, _ = _inputs(torch.float32, 5, 9, False)
    e = torch.tensor([8, -1, 3, 8, 0], device=DEV)
    with torch.no_grad():
        out, attn = m(x, e)
        want = ref(x, e)
    assert torch.isnan(out[1]).all() and torch.isnan(attn[1]).all()
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(out[keep], want[0][keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn[keep], want[1][keep], rtol=1e-5, atol=1e-6)


def test_op_schema_and_fake():
    """The registered schema and the fake implementation (shapes without running the kernel)."""
    x = torch.randn(3, 5, D, device=DEV)
    args = (x, None, torch.randn(L, D, device=DEV), torch.randn(H * A, D, device=DEV), torch.randn(H * A, device=DEV),
            torch.randn(V, A, device=DEV), torch.randn(V, device=DEV), H, A ** -0.5, True)
    torch.library.opcheck(torch.ops.sparo_fast.readout_infer.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- the cache
def _uncached(m, x, e):
    """The same call with the cache off: the absorbed query recomputed from the weights."""
    m.cache_absorbed_query = False
    try:
        with torch.no_grad():
            return m(x, e)
    finally:
        m.cache_absorbed_query = True


def test_cache_reused_while_weights_unchanged():
    m = _module(torch.float32).eval()
    x, e = _inputs(torch.float32, 3, 9, True)
    with torch.no_grad():
        first = m(x, e)
        qt = m.absorbed_cache._value
        (second, names) = _kernels(lambda: m(x, e))
    assert m.absorbed_cache.computed == 1 and m.absorbed_cache._value is qt
    if INTERPRETED:
        assert names == ["_infer_kernel"]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with torch.inference_mode():
        third = m(x, e)
    assert m.absorbed_cache.computed == 1 and torch.equal(third[0], first[0])


@pytest.mark.parametrize("change", ["optimizer_step", "load_state_dict", "in_place_edit", "detached_edit", "to"])
def test_cache_invalidated(change):
    m = _module(torch.float32).eval()
    x, e = _inputs(torch.float32, 3, 9, False)
    with torch.no_grad():
        before = m(x, e)[0]
    if change == "optimizer_step":
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        m.train()
        m(x, e)[0].square().sum().backward()
        opt.step()
        m.eval()
    elif change == "load_state_dict":
        m.load_state_dict(_module(torch.float32, seed=SEED + 7).state_dict())
    elif change == "in_place_edit":
        with torch.no_grad():
            m.q_emb.mul_(-1.5)
    elif change == "detached_edit":  # .detach() shares the version counter (p.data does not: see the docs)
        m.k.weight.detach().mul_(2.0)
    else:
        m.to(torch.float16)
        x = x.half()
    with torch.no_grad():
        after = m(x, e)[0]
    assert m.absorbed_cache.computed == 2
    want = _uncached(m, x, e)[0]
    assert torch.equal(after, want), f"stale absorbed query after {change}"
    if change != "to":
        assert not torch.allclose(after, before, atol=1e-3), "the change should move the output"


def test_cache_cleared_by_hand_after_data_write():
    """``p.data`` writes bypass the version counter: ``absorbed_cache.clear()`` is the remedy."""
    m = _module(torch.float32).eval()
    x, e = _inputs(torch.float32, 2, 9, False)
    with torch.no_grad():
        m(x, e)
    m.q_emb.data.mul_(-1.0)
    m.absorbed_cache.clear()
    with torch.no_grad():
        assert torch.equal(m(x, e)[0], _uncached(m, x, e)[0])


def _grads(m, x, e):
    xx = x.detach().requires_grad_(True)
    out, attn = m(xx, e)
    (out.square().sum() + attn.sum(-1).square().sum()).backward()
    return out


def test_grad_needed_never_uses_the_inference_path():
    """eval() with gradients (and train() under no_grad) run the training op; gradients reach the
    query-side parameters and match the torch backend's."""
    m = _module(torch.float32).eval()
    ref = _module(torch.float32).eval()
    ref.backend = "torch"
    x, e = _inputs(torch.float32, 3, 9, True)
    out, names = _kernels(lambda: _grads(m, x, e))
    _grads(ref, x, e)
    if INTERPRETED:
        assert names and "_infer_kernel" not in names, names  # the training kernels
    assert m.absorbed_cache.computed == 0
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    m.train()
    with torch.no_grad():
        _, names = _kernels(lambda: m(x, e))
    if INTERPRETED:
        assert names and "_infer_kernel" not in names, names
    assert m.absorbed_cache.computed == 0


def test_train_eval_switching_and_micro_steps():
    """Two gradient-accumulation micro-steps with an evaluation between them: the evaluation reuses
    the cache (weights unchanged during accumulation), the accumulated gradients equal the torch
    backend's, and after the optimizer step the next evaluation recomputes."""
    m, ref = _module(torch.float32), _module(torch.float32)
    ref.backend = "torch"
    xs = [_inputs(torch.float32, 3, 9, True, seed=SEED + i) for i in range(3)]
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    outs = []
    for i, (x, e) in enumerate(xs[:2]):
        m.train(), ref.train()
        _grads(m, x, e)
        _grads(ref, x, e)
        m.eval()
        with torch.no_grad():
            outs.append(m(*xs[2]))
        assert m.absorbed_cache.computed == 1, f"micro-step {i}: the weights did not change"
    assert torch.equal(outs[0][0], outs[1][0])
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    opt.step()
    with torch.no_grad():
        after = m(*xs[2])[0]
    assert m.absorbed_cache.computed == 2
    assert torch.equal(after, _uncached(m, *xs[2])[0])
    assert not math.isclose(float(after.sum()), float(outs[0][0].sum()))


def test_torch_compile_eval():
    """torch.compile(fullgraph=True) of a module in eval() under no_grad: the absorbed query is
    computed in the graph (no cache while compiling) and the inference op is called without a
    graph break (opaque under the interpreter); same outputs as eager."""
    torch._dynamo.reset()
    m = _module(torch.float32).eval()
    x, e = _inputs(torch.float32, 3, 9, True)
    with torch.no_grad():
        want = m(x, e)
        got, names = _kernels(lambda: torch.compile(m, fullgraph=True, backend="aot_eager")(x, e))
    if INTERPRETED:
        assert names == ["_infer_kernel"], names
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_autocast_eval_keys_on_master_weights():
    """Under autocast the fp32 master weights are cast each call; the cache keys on the masters and
    the compute dtype, so repeated calls reuse one float16 absorbed query."""
    m = _module(torch.float32).eval()
    x, _ = _inputs(torch.float32, 2, 9, False)
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.float16):
        a = m(x)[0]
        b = m(x)[0]
    assert a.dtype == torch.float16 and m.absorbed_cache.computed == 1 and torch.equal(a, b)
    assert m.absorbed_cache._value.dtype == torch.float16


def test_selfcheck_catches_a_wrong_inference_kernel(monkeypatch):
    """The first call of an "infer" bucket is self-checked like the training kernels': a result
    made wrong on purpose warns once and the torch backend serves that bucket from then on."""
    monkeypatch.setenv("SPARO_FAST_SELFCHECK", "1")
    monkeypatch.setattr(triton_backend, "_checked", {})
    real = triton_backend._fused_infer
    monkeypatch.setattr(triton_backend, "_fused_infer", lambda *a: (real(*a)[0] * 1.01, real(*a)[1]))
    m = _module(torch.float32).eval()
    ref = _module(torch.float32).eval()
    ref.backend = "torch"
    x, e = _inputs(torch.float32, 3, 9, True)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="disagree"):
            got = m(x, e)
        again = m(x, e)
        want = ref(x, e)
    assert list(triton_backend._checked.values()) == [False]
    for g in (got, again):
        torch.testing.assert_close(g[0], want[0], rtol=1e-5, atol=1e-6)


def test_fsdp2_eval_after_optimizer_steps(tmp_path):
    """FSDP2 (one gloo rank; the all-gather refills the unsharded parameters every forward, with
    fp16 compute): evaluations between optimizer steps give what an uncached module gives, and
    an evaluation with unchanged weights reuses nothing stale."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if torch.cuda.is_available() or dist.is_initialized():
        pytest.skip("runs as a single-rank gloo group on the CPU")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        m = _module(torch.float32)
        fully_shard(m, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32))
        opt = torch.optim.AdamW(m.parameters(), lr=0.05)
        x, e = _inputs(torch.float16, 3, 9, True)
        evals = []
        for step in range(2):
            m.eval()
            with torch.no_grad():
                evals.append(m(x, e)[0])
                assert torch.equal(m(x, e)[0], evals[-1])
                assert m.absorbed_cache.computed == step + 1  # reused within an evaluation
                assert torch.equal(_uncached(m, x, e)[0], evals[-1]), f"stale absorbed query at step {step}"
            m.train()
            m(x, e)[0].float().square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert not torch.equal(evals[0], evals[1])
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the item order
_item, _deps = infer._item, infer._deps
FIELDS = 7


@triton.jit
def _decode_kernel(OUT, T, B, C, G, H, LOOK, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    is_proj, c, k = _item(t, G, H, LOOK)
    wait, need, sig, ring = _deps(is_proj, c, B, C, G, H, LOOK)
    m = t < T
    tl.store(OUT + 7 * t, is_proj.to(tl.int32), mask=m)
    tl.store(OUT + 7 * t + 1, c, mask=m)
    tl.store(OUT + 7 * t + 2, k, mask=m)
    tl.store(OUT + 7 * t + 3, wait, mask=m)
    tl.store(OUT + 7 * t + 4, need, mask=m)
    tl.store(OUT + 7 * t + 5, sig, mask=m)
    tl.store(OUT + 7 * t + 6, ring, mask=m)


def _items(B, G, H, LOOK):
    """The kernel's own decoding of every ticket (``_item``, ``_deps``):
    [(is_proj, chunk, head or sample, waits on, needs, signals, ring chunk)]."""
    C = -(-B // G)
    T = LOOK * G + C * (H + G)
    out = torch.zeros(FIELDS * T, dtype=torch.int32, device=DEV)
    _decode_kernel[(1,)](out, T, B, C, G, H, LOOK, BLOCK=triton.next_power_of_2(T))
    return [tuple(int(v) for v in out[FIELDS * i:FIELDS * i + FIELDS]) for i in range(T)], C


def _simulate(B, G, H, LOOK, P, rng):
    """P programs taking tickets and running items in a random interleaving, waiting on the
    counters as the kernel's ``_deps`` says. Checked with separate bookkeeping: a projection reads
    its chunk's ring rows only when all its samples are pooled there, a pool never overwrites
    rows a projection has yet to read, no deadlock, every sample pooled and every (chunk, head)
    projected exactly once."""
    items, C = _items(B, G, H, LOOK)
    flags = [0] * (2 * C)
    n_in = [min(G, B - c * G) for c in range(C)]
    holds = {}  # ring chunk -> (batch chunk, samples pooled into it)
    projections_done = [0] * C
    pooled, projected = [], []
    prog = {}  # program -> [ticket, started]
    ticket = 0

    def grab(p):
        nonlocal ticket
        prog[p] = [ticket, False]
        ticket += 1

    def noop(item):
        is_proj, c, k = item[:3]
        return not is_proj and (c >= C or c * G + k >= B)

    def runnable(p):
        t, started = prog[p]
        wait, need = items[t][3:5]
        return started or noop(items[t]) or wait < 0 or flags[wait] >= need

    for p in range(P):
        grab(p)
    while True:
        live = [p for p in range(P) if prog[p][0] < len(items)]
        if not live:
            break
        ok = [p for p in live if runnable(p)]
        assert ok, f"deadlock: tickets {[prog[p][0] for p in live]}"
        p = rng.choice(ok)
        t, started = prog[p]
        is_proj, c, k, _, _, sig, ring = items[t]
        if noop(items[t]):
            grab(p)
        elif not started:  # the item begins: what it reads or overwrites
            chunk, n = holds.get(ring, (None, 0))
            if is_proj:
                assert chunk == c and n == n_in[c], f"chunk {c} read from ring chunk {ring} holding {chunk}, {n}"
            else:
                assert chunk in (None, c) or projections_done[chunk] == H, \
                    f"ring chunk {ring}: chunk {chunk} overwritten before its projections read it"
                holds[ring] = (c, n if chunk == c else 0)
            prog[p][1] = True
        else:  # the item ends and signals
            flags[sig] += 1
            if is_proj:
                projections_done[c] += 1
                projected.append((c, k))
            else:
                holds[ring] = (c, holds[ring][1] + 1)
                pooled.append(c * G + k)
            grab(p)
    assert sorted(pooled) == list(range(B))
    assert sorted(projected) == [(c, h) for c in range(C) for h in range(H)]


@pytest.mark.parametrize("G,H,LOOK", [(2, 3, 1), (4, 2, 2), (1, 1, 1), (3, 5, 3)])
def test_item_order_is_safe_under_any_interleaving(G, H, LOOK):
    """The GPU runs the items concurrently; the interpreter cannot. The kernel's own ticket
    decoding and waits, replayed by simulated programs in random interleavings (seeded)."""
    import random

    print(f"seed {SEED}")
    rng = random.Random(SEED)
    for B in (1, G, 2 * G + 1, 7 * G + 2):
        for P in (1, 2, 5, 64):
            for _ in range(3):
                _simulate(B, G, H, LOOK, P, rng)


def test_convert_keeps_eval_mode():
    """``convert`` of a published-style module in eval() gives a read-out in eval() (the inference
    path), sharing the parameters."""
    from helpers import PublishedLayoutSparo
    from sparo_fast import convert

    pub = PublishedLayoutSparo(D, L, V, A, num_heads=H).eval()
    new = convert(pub, backend="triton")
    assert not new.training and new.q_emb is pub.q_emb
    assert convert(PublishedLayoutSparo(D, L, V, A).train()).training
