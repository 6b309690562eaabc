"""Each kernel against the PyTorch ``*_ref`` beside it, one kernel at a time.

Every kernel is launched on its own (the op module's ``launch_*`` functions) on independent
random inputs, so a wrong kernel cannot be masked by a compensating one. Truth is the ref in
float64; the allowance is twice PyTorch's own error at the kernel's precision plus an ulp
floor (``ULPS`` ulps of the output dtype times the reference's norm). PyTorch's own error is
the same ref on the same dtype-representable inputs with fp32 accumulation, outputs rounded
to the kernel's output dtype; where the kernel rounds an intermediate to the compute dtype
before a product (dqt: ``gs``; gxp, dW_V, db_V: ``go``) the ref runs its products in that
dtype too. Both token-axis
kernels run their one-tile and their tiled paths (``TILED_OVERRIDE``), and the test asserts
which path ran.
"""
from __future__ import annotations

import pytest
import torch

from sparo_fast import sparo_readout_triton as triton_backend

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_backend.is_available(DEV), reason="needs Triton (GPU or interpreter)")

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10}
# fp32: the kernels' fp32 accumulation order differs from PyTorch's (tens of ulps on sums of
# hundreds of terms); half: p and gs are cast to the compute dtype before their products, as
# the torch backend does, which costs a few ulps of the result
ULPS = {torch.float32: 64, torch.float16: 1}
SEED = 1234


def _check(name, got, truth, ref_lo, out_dtype):
    got, truth, ref_lo = got.double(), truth.double(), ref_lo.to(out_dtype).double()
    err = float((got - truth).norm())
    own = float((ref_lo - truth).norm())
    allowed = 2 * own + ULPS[out_dtype if out_dtype in ULPS else torch.float32] * EPS.get(
        out_dtype, EPS[torch.float32]) * float(truth.norm()) + 1e-12
    assert err <= allowed, f"{name}: error {err:.3e} > allowed {allowed:.3e} (ref's own {own:.3e}, seed {SEED})"


def _inputs(dtype, B=3, N=37, D=45, H=3, S=2, A=6, Vd=7, V=9):
    print(f"seed {SEED}")
    gen = torch.Generator().manual_seed(SEED)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEV)

    x = r(N, B, D).permute(1, 0, 2)  # sequence-first storage: strided x
    return dict(x=x, eos=torch.tensor([N - 1, 3, 20], device=DEV), q=r(1, H, S, 1, A), kw=r(H * A, D, scale=D**-0.5),
                vw=r(H * Vd, D, scale=D**-0.5), vb=r(H * Vd), pw=r(V, Vd, scale=Vd**-0.5), pb=r(V),
                qt=r(H * S, D, scale=0.5), xp=r(H, B * S, D), o=r(B, H * S, Vd), g=r(B, H * S, V),
                ga=r(B, H * S, N), gxp=r(H, B * S, D), part=r(4, H * S, D).float(), dwv=r(H * A, D),
                dwo_p=r(H, V, Vd).float(), dbo_p=r(H, V).float(), H=H, S=S, A=A)


def _wide(d):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in d.items()}


@pytest.fixture(autouse=True)
def _refs_at_precision(monkeypatch):
    """``lo(fn, *args)``: a ref with its products in the inputs' own dtype (PyTorch at that
    precision) instead of the refs' fp32 accumulation."""
    from sparo_fast_kernels import sparo_readout_bwd as bwd
    from sparo_fast_kernels import sparo_readout_fwd as fwd

    def lo(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(fwd, "_wide", lambda t: t)
            m.setattr(bwd, "_wide", lambda t: t)
            return fn(*args)

    global _lo
    _lo = lo


def _lo(fn, *args):  # replaced by the fixture above
    raise AssertionError


@pytest.fixture
def ops():
    from sparo_fast_kernels import sparo_readout_op as ops

    yield ops
    ops.TILED_OVERRIDE = None


@pytest.mark.parametrize("tiled", [False, True], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fwd_pool(ops, dtype, tiled):
    from sparo_fast_kernels.sparo_readout_fwd import fwd_pool_ref

    ops.TILED_OVERRIDE = 16 if tiled else None
    t = _inputs(dtype)
    scale = t["A"] ** -0.5
    attn, lse, xp = ops.launch_fwd_pool(t["x"], t["eos"], t["qt"], scale, t["H"], True)
    assert ops.LAST_PATHS["pool"] == ("tiled" if tiled else "one_tile")
    w = _wide(t)
    truth = fwd_pool_ref(w["x"], w["eos"], w["qt"], scale, t["H"])
    lo32 = fwd_pool_ref(t["x"], t["eos"], t["qt"], scale, t["H"])
    # scores, softmax and pooling accumulate in fp32 in the kernel: PyTorch in fp32 (outputs
    # rounded to the kernel's) is the tighter peer, and the one used
    for name, got, tr, r, od in zip(("attn", "lse", "xp"), (attn, lse, xp), truth, lo32, (dtype, torch.float32, dtype)):
        _check(name, got, tr, r, od)


@pytest.mark.parametrize("S,A", [(1, 6), (3, 80)], ids=["S1_A6", "S3_A80"])  # A = 80: two chunks of 64
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_absorb(ops, dtype, shared, S, A):
    from sparo_fast_kernels.sparo_readout_fwd import absorb_ref

    t = _inputs(dtype, S=S, A=A)
    qt = ops.launch_absorb(t["q"], t["kw"], shared)
    assert qt.shape == (t["H"] * S, t["x"].shape[2]) and qt.dtype == dtype
    _check("qt", qt, absorb_ref(_wide(t)["q"], _wide(t)["kw"]), _lo(absorb_ref, t["q"], t["kw"]), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fwd_proj(ops, dtype):
    from sparo_fast_kernels.sparo_readout_fwd import fwd_proj_ref

    t = _inputs(dtype)
    B = t["x"].shape[0]
    got = ops.launch_fwd_proj(t["xp"], t["vw"], t["vb"], t["pw"], t["pb"], B)
    w = _wide(t)
    truth = fwd_proj_ref(w["xp"], w["vw"], w["vb"], w["pw"], w["pb"], t["H"], B)
    lo = _lo(fwd_proj_ref, t["xp"], t["vw"], t["vb"], t["pw"], t["pb"], t["H"], B)
    for name, g_, tr, r in zip(("o", "out"), got, truth, lo):
        _check(name, g_, tr, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bwd_slot(ops, dtype):
    from sparo_fast_kernels.sparo_readout_bwd import bwd_slot_ref

    t = _inputs(dtype)
    got = ops.launch_bwd_slot(t["g"], t["o"], t["xp"], t["vw"], t["pw"])
    w = _wide(t)
    truth = bwd_slot_ref(w["g"], w["o"], w["xp"], w["vw"], w["pw"])
    lo = _lo(bwd_slot_ref, t["g"], t["o"], t["xp"], t["vw"], t["pw"])
    lo32 = bwd_slot_ref(t["g"], t["o"], t["xp"], t["vw"], t["pw"])
    for name, g_, tr, r in zip(("gxp", "dW_V", "db_V"), got, truth, lo):
        _check(name, g_, tr, r, dtype)
    for name, g_, tr, r in zip(("dW_O partials", "db_O partials"), got[3:], truth[3:], lo32[3:]):
        _check(name, g_, tr, r, torch.float32)  # fp32 products of dtype operands, fp32 results


@pytest.mark.parametrize("tiled", [False, True], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bwd_token(ops, dtype, tiled, monkeypatch):
    from sparo_fast_kernels import sparo_readout_bwd as bwd
    from sparo_fast_kernels.sparo_readout_fwd import from_head_major, fwd_pool_ref

    monkeypatch.setattr(bwd, "PROGRAMS_OVERRIDE", 2)  # one program takes two samples: partial read-back
    ops.TILED_OVERRIDE = 16 if tiled else None
    t = _inputs(dtype)
    B, scale = t["x"].shape[0], t["A"] ** -0.5
    _, lse, _ = fwd_pool_ref(t["x"], t["eos"], t["qt"], scale, t["H"])
    dx, part = ops.launch_bwd_token(t["x"], t["eos"], lse, t["ga"], t["gxp"], t["qt"], scale)
    assert ops.LAST_PATHS["token"] == ("tiled" if tiled else "one_tile")
    assert part.shape[0] == 2
    res = {}
    for key, d in (("truth", _wide(t)), ("lo32", t), ("lo", t)):
        run = (lambda fn, *a: fn(*a)) if key != "lo" else _lo
        p, _, _ = run(fwd_pool_ref, d["x"], d["eos"], d["qt"], scale, t["H"])
        res[key] = run(bwd.bwd_token_ref, d["x"], p.to(dtype) if key == "lo" else p, d["ga"],
                       from_head_major(d["gxp"], B), d["qt"], scale)
    _check("dx", dx, res["truth"][0], res["lo32"][0], dtype)
    # dqt: gs is cast to the compute dtype before its product, as PyTorch in that dtype does
    _check("dqt", part.sum(0), res["truth"][1], res["lo"][1], torch.float32)
    for b, e in enumerate(t["eos"].tolist()):
        assert torch.count_nonzero(dx[b, e + 1:]) == 0  # no gradient past EOS, exactly


@pytest.mark.parametrize("H,S", [(3, 1), (2, 16)], ids=["S1", "S16"])  # partial rows below / at the dot's 16
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_bwd_finish(ops, dtype, shared, H, S):
    from sparo_fast_kernels.sparo_readout_bwd import bwd_finish_ref

    t = _inputs(dtype, D=70, H=H, S=S)  # several feature tiles, the last one partial; weight-sized fp32 products
    got = ops.launch_bwd_finish(t["part"], t["q"], t["kw"], t["dwv"], t["dwo_p"], t["dbo_p"], shared, dtype)
    w = _wide(t)
    truth = bwd_finish_ref(w["part"], w["q"], w["kw"], w["dwv"] if shared else None, w["dwo_p"], w["dbo_p"])
    lo = bwd_finish_ref(t["part"], t["q"], t["kw"], t["dwv"] if shared else None, t["dwo_p"], t["dbo_p"])
    for name, g_, tr, r in zip(("dq", "dW_K", "dW_O", "db_O"), got, truth, lo):
        _check(name, g_, tr, r, dtype)


# the persistent kernels' two ways to hand out work items under the interpreter: the GPU's
# ticket loop (``INTERPRETER_TICKETS``), and one program per item (the interpreter's default)
TICKET_MODES = pytest.mark.parametrize("dtype,tickets", [(torch.float32, True), (torch.float16, False)],
                                       ids=["fp32-tickets", "fp16-per_item"])


@pytest.mark.parametrize("tiled", [False, True], ids=["one_tile", "tiled"])
@TICKET_MODES
def test_fwd_fused(ops, dtype, tickets, tiled, monkeypatch):
    """The one-launch forward (pooling and projections, work items in ``fused_schedule`` order)
    against the refs, and bitwise equal to the split pool and projection kernels: the same
    arithmetic whichever program takes which item."""
    from sparo_fast_kernels.sparo_readout_fwd import fwd_pool_ref, fwd_proj_ref

    monkeypatch.setattr(ops, "INTERPRETER_TICKETS", tickets)
    ops.TILED_OVERRIDE = 16 if tiled else None
    t = _inputs(dtype)
    B, scale = t["x"].shape[0], t["A"] ** -0.5
    got = ops.launch_fwd_fused(t["x"], t["eos"], t["qt"], scale, t["H"], True, t["vw"], t["vb"], t["pw"], t["pb"])
    assert ops.LAST_PATHS["pool"] == ("tiled" if tiled else "one_tile")
    split = ops.launch_fwd_pool(t["x"], t["eos"], t["qt"], scale, t["H"], True)
    split += ops.launch_fwd_proj(split[2], t["vw"], t["vb"], t["pw"], t["pb"], B)
    for name, a, b in zip(("attn", "lse", "xp", "o", "out"), got, split):
        assert torch.equal(a, b), f"{name}: the fused forward differs from the split kernels (seed {SEED})"
    if tickets:  # a share of the programs (the L2-bound choice): one program takes every item in order
        one = ops.launch_fwd_fused(t["x"], t["eos"], t["qt"], scale, t["H"], True, t["vw"], t["vb"], t["pw"],
                                   t["pb"], programs=1)
        for name, a, b in zip(("attn", "lse", "xp", "o", "out"), one, got):
            assert torch.equal(a, b), f"{name}: one forward program differs from two (seed {SEED})"
    w = _wide(t)
    truth = fwd_pool_ref(w["x"], w["eos"], w["qt"], scale, t["H"])
    lo32 = fwd_pool_ref(t["x"], t["eos"], t["qt"], scale, t["H"])
    for name, g_, tr, r, od in zip(("attn", "lse", "xp"), got, truth, lo32, (dtype, torch.float32, dtype)):
        _check(name, g_, tr, r, od)
    # the projections, from the fused kernel's own pooled rows (the pool is checked just above)
    truth = fwd_proj_ref(got[2].double(), w["vw"], w["vb"], w["pw"], w["pb"], t["H"], B)
    lo = _lo(fwd_proj_ref, got[2], t["vw"], t["vb"], t["pw"], t["pb"], t["H"], B)
    for name, g_, tr, r in zip(("o", "out"), got[3:], truth, lo):
        _check(name, g_, tr, r, dtype)


def test_older_triton_takes_the_split_forward(ops, monkeypatch):
    """Before Triton 3.8 the persistent forward spilled in every config (compile matrix): the op
    then runs the split pool and projection kernels, with bitwise the same results."""
    t = _inputs(torch.float16)
    args = (t["x"], t["eos"], t["q"], t["kw"], torch.zeros_like(t["kw"][:, 0]), t["vw"], t["vb"], t["pw"], t["pb"],
            True)
    runs, launch = {}, ops._launch
    for version, fused in (("3.8.0", True), ("3.6.0", False), ("3.10.1", True), ("3.4.0", False)):
        monkeypatch.setattr(ops.triton, "__version__", version)
        launched = []
        monkeypatch.setattr(ops, "_launch", lambda k, *a, _l=launched: (_l.append(k), launch(k, *a))[1])
        runs[version] = ops._readout_fwd(*args)
        assert ops.fused_forward() == fused, version
        names = [ops.at.kernel_name(k) for k in launched]
        assert names == ["_absorb_kernel"] + (["_fwd_fused_kernel"] if fused else ["_fwd_pool_kernel",
                                                                                  "_fwd_proj_kernel"]), version
    for version, got in runs.items():
        for name, a, b in zip(("out", "attn", "qt", "lse", "xp", "o"), got, runs["3.8.0"]):
            assert torch.equal(a, b), (version, name, SEED)


@pytest.mark.parametrize("B,S,H,BM", [(3, 2, 3, 16), (5, 3, 2, 4), (200, 1, 8, 64), (7, 16, 2, 32)])
def test_fused_schedule_orders_every_tile_after_its_samples(B, S, H, BM):
    """Deadlock freedom of the fused forward rests on this order: every item once, and each
    projection tile after every sample with rows in it (a waiting program then only waits for
    tickets already taken)."""
    from sparo_fast_kernels.sparo_readout_fwd import fused_schedule

    order = fused_schedule(B, S, H, BM)
    tiles = -(-(B * S) // BM)
    assert sorted(i for i in order if i >= 0) == list(range(B))
    assert sorted(-i - 1 for i in order if i < 0) == list(range(tiles * H))
    pos = {i: k for k, i in enumerate(order)}
    for tile in range(tiles * H):
        rows = range((tile // H) * BM, min(B * S, (tile // H + 1) * BM))
        assert all(pos[r // S] < pos[-tile - 1] for r in rows)
    # the kernel's closed form of the same order
    assert _fused_items(B, S, H, BM, len(order)).tolist() == order


try:  # module level: the interpreter resolves a kernel's callees in its module's globals
    import triton
    import triton.language as tl

    from sparo_fast_kernels.sparo_readout_fwd import _fused_item

    @triton.jit
    def _items_kernel(OUT, B, S, H, BM: tl.constexpr):
        t = tl.program_id(0)
        tl.store(OUT + t, _fused_item(t, B, B * S, S, H, BM))
except ImportError:  # no Triton: every test here is skipped
    pass


def _fused_items(B, S, H, BM, n):
    """``_fused_item`` of tickets 0 .. n-1, one program per ticket."""
    out = torch.empty(n, dtype=torch.int32, device=DEV)
    _items_kernel[(n,)](out, B, S, H, BM)
    return out.cpu()


@pytest.mark.parametrize("tiled", [False, True], ids=["one_tile", "tiled"])
@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared_kv"])
@TICKET_MODES
def test_bwd_fused(ops, dtype, tickets, shared, tiled, monkeypatch):
    """The whole backward in one launch (slot tiles, then token owners waiting for every slot
    tile, then finish tiles waiting for every owner): bitwise equal to the three kernels run one
    after another (each checked against its ref above), and dx and the weight gradients within
    the criterion of the float64 chain of refs."""
    from sparo_fast_kernels import sparo_readout_bwd as bwd
    from sparo_fast_kernels.sparo_readout_fwd import from_head_major, fwd_pool_ref

    monkeypatch.setattr(bwd, "PROGRAMS_OVERRIDE", 2)  # one owner takes two samples: partial read-back
    monkeypatch.setattr(ops, "INTERPRETER_TICKETS", tickets)
    ops.TILED_OVERRIDE = 16 if tiled else None
    t = _inputs(dtype, D=70, Vd=6)  # several finish feature tiles, the last one partial; A = Vd
    B, scale = t["x"].shape[0], t["A"] ** -0.5
    _, lse, _ = fwd_pool_ref(t["x"], t["eos"], t["qt"], scale, t["H"])
    q, kw = t["q"], (t["vw"] if shared else t["kw"])  # shared k/v: one tensor
    got = ops.launch_bwd_fused(t["g"], t["o"], t["xp"], t["vw"], t["pw"], t["x"], t["eos"], lse, t["ga"], t["qt"],
                               scale, q, kw, shared)
    assert ops.LAST_PATHS["token"] == ("tiled" if tiled else "one_tile")
    gxp, dwv, dbv, dwo_p, dbo_p = ops.launch_bwd_slot(t["g"], t["o"], t["xp"], t["vw"], t["pw"])
    dx, part = ops.launch_bwd_token(t["x"], t["eos"], lse, t["ga"], gxp, t["qt"], scale)
    dq, dwk, dwo, dbo = ops.launch_bwd_finish(part, q, kw, dwv, dwo_p, dbo_p, shared, dtype)
    if shared:  # dW_V formed in dW_K's buffer, dW_K's tiles added in place: one gradient, no dW_V of its own
        assert got[3].data_ptr() == got[2].data_ptr()
    for name, a, b in zip(("dx", "dq", "dW_K", "dW_V", "db_V", "dW_O", "db_O"), got,
                          (dx, dq, dwk, dwv, dbv, dwo, dbo)):
        if not (shared and name == "dW_V"):
            assert torch.equal(a, b), f"{name}: the one-launch backward differs from the three kernels (seed {SEED})"
    res = {}
    for key, d in (("truth", _wide(t)), ("lo", t)):
        run = (lambda fn, *a: fn(*a)) if key != "lo" else _lo
        p_, _, _ = run(fwd_pool_ref, d["x"], d["eos"], d["qt"], scale, t["H"])
        g_h, dwv_r = run(bwd.bwd_slot_ref, d["g"], d["o"], d["xp"], d["vw"], d["pw"])[:2]
        dx_r, dqt = run(bwd.bwd_token_ref, d["x"], p_.to(d["x"].dtype), d["ga"], from_head_major(g_h.to(d["x"].dtype), B),
                        d["qt"], scale)
        qd = d["q"]
        fin = bwd.bwd_finish_ref(dqt[None].to(qd.dtype if key == "truth" else torch.float32), qd,
                                 d["vw"] if shared else d["kw"], dwv_r if shared else None, *run(
                                     bwd.bwd_slot_ref, d["g"], d["o"], d["xp"], d["vw"], d["pw"])[3:])
        res[key] = (dx_r, fin[1])
    _check("dx", got[0], res["truth"][0], res["lo"][0], dtype)
    _check("dW_K", got[2], res["truth"][1], res["lo"][1], dtype)
