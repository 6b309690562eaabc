"""The ``triton`` backend: fused kernels vs the golden files and the float64 reference.

Without a GPU these run the real Triton kernels in the CPU interpreter (``TRITON_INTERPRET=1``
is set by ``conftest.py`` before the kernels are imported), on tiny shapes. bfloat16 needs a
GPU (see ``test_bf16_gpu``); the ``GPU`` section at the end runs the benchmark shape.

Error criterion: ``accuracy.py``'s, element by element, for every output, the attention map and
every gradient: the kernel's largest error against the float64 reference must be at most twice
PyTorch's own largest error at the same precision on the same inputs (the worst of the published
formulation, the absorbed one, and the absorbed one with its probabilities taken from the
log-sum-exp as the kernels' backward recomputes them; in the random-configuration tests also on
three sets of neighbouring inputs one ulp away, ``_pytorch_errors``), or the floor
3 x max(eps, eps_acc x sqrt(K)) x max|ref| (K: the longest sum behind the result,
``accuracy.readout_lengths``; eps_acc: float32's for half-precision inputs). A TF32 product fails the
float32 criterion (``test_criterion_rejects_tf32``).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparo_fast import SparoReadout, sparo_absorbed, sparo_reference
from sparo_fast import sparo_readout_triton as triton_backend
from sparo_fast.params import ReadoutParams
from torch._functorch import config as functorch_config
from torch._inductor import config as inductor_config
from torch._library.infer_schema import infer_schema
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from accuracy import absorbed_from_lse, assert_close, measure, module_lengths, readout_lengths

# The kernels need Triton (a Linux-only dependency of the dev extra); conftest.py has set
# TRITON_INTERPRET=1 on machines without a GPU before this import defines them.
ops = pytest.importorskip("sparo_fast_kernels.sparo_readout_op", reason="Triton is not importable")
sparo_bwd = pytest.importorskip("sparo_fast_kernels.sparo_readout_bwd")
sparo_fwd = pytest.importorskip("sparo_fast_kernels.sparo_readout_fwd")

DATA = Path(__file__).parent / "data"
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

pytestmark = pytest.mark.skipif(
    not triton_backend.is_available(DEV),
    reason="Triton is not importable, or no CUDA device and TRITON_INTERPRET!=1 (see conftest.py)")

GOLDEN_THRESH = {torch.float32: 2e-6, torch.float16: 5e-3}  # relative, vs the published float64 outputs
PARAM_NAMES = ("q_emb", "k.weight", "k.bias", "v.weight", "v.bias", "proj.weight", "proj.bias")


def _lengths(cfg) -> dict:
    B, N, D, H, S, A, Vd, V = (cfg[k] for k in ("B", "N", "D", "H", "S", "A", "Vd", "V"))
    return readout_lengths(B, N, D, H * S, S, A, A if cfg["share"] else Vd, V)


def _check(name, got, ref, torch_got, dtype, K, seed):
    """got vs the float64 ref, element-wise: within 2x PyTorch's own error (``torch_got``: one
    PyTorch result or a tuple of them, the worst counts) or ``accuracy.floor`` (which also covers
    the interpreter's truncating fp32 -> bf16 casts: half an ulp more per cast)."""
    return assert_close(name, got, ref, torch_got, dtype=dtype, K=K, seed=seed)


# ----------------------------------------------------------------------------- golden files
GOLDEN = sorted(p.name for p in DATA.glob("readout_*.pt"))


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fname", GOLDEN)
def test_golden(fname, dtype):
    """The published implementation's float64 tensors, reproduced in float32 / float16: the
    accuracy criterion, and the relative bounds ``GOLDEN_THRESH`` these tests began with."""
    g = torch.load(DATA / fname, weights_only=False)
    cfg, share = g["config"], g["config"]["share_kv"]
    params = [g["state_dict"][k].double() for k in PARAM_NAMES]
    args = (g["x"].double(), g["eos_indices"], params, g["grad_out"].double(), g["grad_attn"].double(), share, True)
    tri = _run(triton_backend.sparo_triton, *args, dtype, False)
    assert tri["out"].dtype == dtype and tri["attn"].dtype == dtype
    variants = [_run(fn, *args, dtype, False) for fn in (sparo_reference, sparo_absorbed, absorbed_from_lse)]
    B, N, D = g["x"].shape
    heads = cfg["num_heads"] or cfg["L"]
    ks = readout_lengths(B, N, D, cfg["L"], cfg["L"] // heads, cfg["attn_dim"], cfg["value_dim"] or cfg["attn_dim"],
                         cfg["V"])
    want = {"out": g["out"], "attn": g["attn"], **g["grads"]}
    assert set(want) == set(tri), "gradient set differs from the published module's"
    for name, ref in want.items():
        ref = ref.to(DEV)
        if name == "k.bias" and not share:
            # the key bias cancels in the softmax: exactly zero here, rounding-level in the reference
            assert torch.count_nonzero(tri[name]) == 0
            assert float(ref.norm()) <= 1e-8 * float(g["grads"]["x"].norm()) + 1e-10
            continue
        _check(name, tri[name], ref, tuple(v[name] for v in variants), dtype, ks[name], f"none (golden file {fname})")
        assert _rel(tri[name], ref) <= GOLDEN_THRESH[dtype], name


# ----------------------------------------------------------------------------- random configs
def _make(cfg, dtype, seed):
    """Inputs and parameters representable in `dtype`, held in float64.

    Every run (the float64 reference, PyTorch at `dtype`, the kernels) sees the same values, as
    FlashAttention's tests do: the error of rounding the inputs to `dtype` is common to PyTorch
    and the kernels but not cancelled in both alike, so with unrounded references PyTorch's own
    error could happen to cancel it where a kernel's (smaller) computation error did not."""
    gen = torch.Generator().manual_seed(seed)
    B, N, D, H, S, A, Vd, V = (cfg[k] for k in ("B", "N", "D", "H", "S", "A", "Vd", "V"))
    L = H * S
    share = cfg["share"]
    if share:
        Vd = A
    q = torch.randn(1, H, S, 1, A, generator=gen, dtype=torch.float64)
    kw = torch.randn(H * A, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    kb = torch.randn(H * A, generator=gen, dtype=torch.float64) * 0.1
    vw = kw if share else torch.randn(H * Vd, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    vb = kb if share else torch.randn(H * Vd, generator=gen, dtype=torch.float64) * 0.1
    pw = torch.randn(V, Vd, generator=gen, dtype=torch.float64) / math.sqrt(Vd)
    pb = torch.randn(V, generator=gen, dtype=torch.float64) * 0.1
    x = torch.randn(B, N, D, generator=gen, dtype=torch.float64) * cfg["xscale"]
    eos = None
    if cfg["eos"] == "random":
        eos = torch.randint(0, N, (B,), generator=gen)
    elif cfg["eos"] == "edges":
        eos = torch.tensor([0, N - 1] * B)[:B]
    go = torch.randn(B, L, V, generator=gen, dtype=torch.float64)
    ga = torch.randn(B, L, N, generator=gen, dtype=torch.float64) if cfg["grad_attn"] else None

    def rep(t):
        return None if t is None else t.to(dtype).double()

    return rep(x), eos, [rep(p) for p in (q, kw, kb, vw, vb, pw, pb)], rep(go), rep(ga)


def _run(fn, x, eos, params, go, ga, share, need_weights, dtype, noncontig):
    """Forward + backward of `fn` in `dtype`; returns out, attn and the gradients by name."""
    xs = x.to(DEV, dtype)
    if noncontig:  # x = y.permute(1, 0, 2) of a [N, B, D] tensor
        xs = xs.permute(1, 0, 2).contiguous().permute(1, 0, 2)
        assert xs.is_contiguous() == (min(xs.shape[:2]) == 1)
    xs.requires_grad_()
    leaves = [p.to(DEV, dtype).requires_grad_() for p in params]
    if share:  # one tensor for k and v, as nn.Linear sharing does
        leaves[3], leaves[4] = leaves[1], leaves[2]
    e = None if eos is None else eos.to(DEV)
    out, attn = fn(xs, e, ReadoutParams(*leaves), need_weights=need_weights)
    loss = (out * go.to(DEV, dtype)).sum()
    if need_weights and ga is not None:
        loss = loss + (attn * ga.to(DEV, dtype)).sum()
    uniq = [0, 1, 2, 5, 6] if share else list(range(7))
    grads = torch.autograd.grad(loss, [xs] + [leaves[i] for i in uniq], allow_unused=True)
    res = {"out": out.detach(), "attn": None if attn is None else attn.detach(), "x": grads[0]}
    for i, gr in zip(uniq, grads[1:]):
        res[PARAM_NAMES[i]] = gr
    return res


configs = st.fixed_dictionaries({
    "B": st.integers(1, 3),
    "N": st.integers(1, 40),
    "D": st.integers(1, 70),
    "H": st.integers(1, 4),
    "S": st.integers(1, 3),
    "A": st.integers(1, 12),
    "Vd": st.integers(1, 12),
    "V": st.integers(1, 10),
    "share": st.booleans(),
    "eos": st.sampled_from([None, "random", "edges"]),
    "need_weights": st.booleans(),
    "grad_attn": st.booleans(),
    "noncontig": st.booleans(),
    "xscale": st.sampled_from([0.5, 1.0, 3.0]),
    "seed": st.integers(0, 2**16),
})


#: Neighbouring inputs on which PyTorch's own error is also measured (see ``_pytorch_errors``).
NEIGHBOURS = 3
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _neighbour(t, dtype, gen):
    """``t`` (representable in ``dtype``) with every element moved 0 or 1 ulp either way at random."""
    if t is None:
        return None
    bits = t.to(dtype).view(_BITS[dtype])
    step = torch.randint(-1, 2, t.shape, generator=gen).to(bits.dtype)
    step = torch.where(t != 0, step, 0)  # a step below +-0 would be a NaN pattern
    return (bits + step).view(dtype).double()


def _pytorch_errors(args, ref, dtype, seed):
    """PyTorch's results at ``dtype`` (the three formulations), on the inputs themselves and on
    ``NEIGHBOURS`` sets of neighbouring inputs one ulp away, each shifted onto ``ref`` so that
    ``result - ref`` is its error against the float64 reference of its own inputs.

    Why the neighbours: a result with a handful of elements (``q_emb`` at H = S = A = 1 is one
    number) gives one draw of PyTorch's rounding error, and one draw can land near zero by
    cancellation, leaving an allowance below what this result's conditioning implies (a kernel
    that rounds the same intermediates failed at 2.2x such a draw). The worst error over inputs
    that differ only by an ulp is the error scale of this computation at this precision."""
    x, eos, params, go, ga, share, need_weights = args
    gen = torch.Generator().manual_seed(seed)
    fns = (sparo_absorbed, sparo_reference, absorbed_from_lse)
    out = [_run(fn, *args, dtype, False) for fn in fns]
    for _ in range(NEIGHBOURS):
        nx, ngo, nga = (_neighbour(t, dtype, gen) for t in (x, go, ga))
        nparams = [_neighbour(t, dtype, gen) for t in params]
        nargs = (nx, eos, nparams, ngo, nga, share, need_weights)
        nref = _run(sparo_reference, *nargs, torch.float64, False)
        for fn in fns:
            got = _run(fn, *nargs, dtype, False)
            out.append({k: None if v is None else v.double() - nref[k] + ref[k] for k, v in got.items()})
    return out


def _compare_to_reference(cfg, dtype):
    x, eos, params, go, ga = _make(cfg, dtype, cfg["seed"])
    args = (x, eos, params, go, ga, cfg["share"], cfg["need_weights"])
    ref = _run(sparo_reference, *args, torch.float64, False)
    tri = _run(triton_backend.sparo_triton, *args, dtype, cfg["noncontig"])
    variants = _pytorch_errors(args, ref, dtype, cfg["seed"])
    if not cfg["need_weights"]:
        assert tri["attn"] is None
    ks = _lengths(cfg)
    for name, r in ref.items():
        if r is None:
            continue
        if name == "k.bias" and not cfg["share"]:  # cancels in the softmax: exactly zero
            assert torch.count_nonzero(tri[name]) == 0
            continue
        _check(name, tri[name], r, tuple(v[name] for v in variants), dtype, ks[name], cfg["seed"])


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 values with TF32's 10-bit mantissa (low 13 bits cleared), as a TF32 product sees them."""
    return (t.float().view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_criterion_rejects_tf32():
    """The float32 criterion is tight enough that TF32-rounded products would fail it: the torch
    backend on TF32-rounded inputs (what a TF32 tensor-core product multiplies) is rejected."""
    cfg = dict(B=2, N=9, D=40, H=2, S=2, A=8, Vd=8, V=6, share=False, eos=None, need_weights=True,
               grad_attn=False, noncontig=False, xscale=1.0, seed=4)
    x, eos, params, go, ga = _make(cfg, torch.float32, cfg["seed"])
    args = (eos, params, go, ga, False, True)
    ref = _run(sparo_reference, x, *args, torch.float64, False)
    tor = _run(sparo_absorbed, x, *args, torch.float32, False)
    tf32 = _run(sparo_absorbed, _tf32(x).double(), eos, [_tf32(p).double() for p in params], go, ga, False, True,
                torch.float32, False)
    K, seed = _lengths(cfg)["out"], cfg["seed"]
    _check("out", tor["out"], ref["out"], tor["out"], torch.float32, K, seed)  # torch passes its own criterion
    bad = measure("out", tf32["out"], ref["out"], tor["out"], dtype=torch.float32, K=K, seed=seed, log=False)
    assert not bad.ok and bad.err > 10 * bad.allowed, bad.message()


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_random_configs_fp32(cfg):
    _compare_to_reference(cfg, torch.float32)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs)
def test_random_configs_fp16(cfg):
    _compare_to_reference(cfg, torch.float16)


@pytest.mark.parametrize("eos", [None, "random"], ids=["vision", "text"])
def test_long_sequences_wide_tokens(eos):
    """N >= 1024 and D >= 1280 (many token and feature tiles) on few slots, cheap enough for
    the interpreter; ``test_gpu_large_tiled`` runs the same sizes with more slots on a GPU."""
    cfg = dict(B=1, N=1030, D=1290, H=1, S=2, A=3, Vd=4, V=5, share=False, eos=eos,
               need_weights=True, grad_attn=True, noncontig=True, xscale=1.0, seed=5)
    _compare_to_reference(cfg, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("H,S", [(3, 23), (4, 25)], ids=["L69", "L100"])
def test_tiled_shapes(dtype, H, S):
    """N, D and L larger than one block, none a power of two, subheads, eos, non-contiguous x."""
    cfg = dict(B=2, N=75, D=150, H=H, S=S, A=5, Vd=9, V=70, share=False, eos="random",
               need_weights=True, grad_attn=True, noncontig=True, xscale=1.0, seed=3)
    _compare_to_reference(cfg, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_eos_skips_tiles(dtype):
    """Token tiles wholly past EOS are skipped: attn and dx are exactly zero there, rest matches."""
    cfg = dict(B=3, N=70, D=40, H=2, S=3, A=6, Vd=5, V=7, share=False, eos=None,
               need_weights=True, grad_attn=True, noncontig=False, xscale=1.0, seed=11)
    x, _, params, go, ga = _make(cfg, dtype, cfg["seed"])
    eos = torch.tensor([0, 69, 5])
    args = (x, eos, params, go, ga, False, True)
    ref = _run(sparo_reference, *args, torch.float64, False)
    tri = _run(triton_backend.sparo_triton, *args, dtype, False)
    tor = _run(sparo_absorbed, *args, dtype, False)
    for b, e in enumerate(eos.tolist()):
        assert torch.count_nonzero(tri["attn"][b, :, e + 1:]) == 0
        assert torch.count_nonzero(tri["x"][b, e + 1:]) == 0
    ks = _lengths(cfg)
    for name, r in ref.items():
        if name != "k.bias":
            _check(name, tri[name], r, tor[name], dtype, ks[name], cfg["seed"])


def test_persistent_programs_and_determinism(monkeypatch):
    """Persistent backward programs (several samples each, per-program dqt partials), and
    bitwise-reproducible gradients for a given number of programs."""
    cfg = dict(B=5, N=13, D=33, H=2, S=2, A=6, Vd=7, V=5, share=False, eos="random",
               need_weights=True, grad_attn=True, noncontig=False, xscale=1.0, seed=7)
    x, eos, params, go, ga = _make(cfg, torch.float32, cfg["seed"])
    args = (x, eos, params, go, ga, False, True, torch.float32, False)
    base = _run(triton_backend.sparo_triton, *args)
    again = _run(triton_backend.sparo_triton, *args)
    for k, v in base.items():
        assert torch.equal(v, again[k]), k
    ref = _run(sparo_absorbed, *args[:-2], torch.float64, False)
    tor = _run(sparo_absorbed, *args)
    for programs in (1, 3):  # one program for all 5 samples; programs of 2, 2 and 1 samples
        monkeypatch.setattr(sparo_bwd, "PROGRAMS_OVERRIDE", programs)
        grouped = _run(triton_backend.sparo_triton, *args)
        for k, v in base.items():
            if k != "k.bias":  # separate k/v: exactly zero (asserted by the config tests)
                _check(f"{k} ({programs} programs)", grouped[k], ref[k], tor[k], torch.float32, _lengths(cfg)[k],
                       cfg["seed"])
            torch.testing.assert_close(grouped[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _bf16_configs():
    for seed in range(4):
        yield dict(B=3, N=77, D=100, H=4, S=2, A=16, Vd=16, V=24, share=seed % 2 == 0, eos="random",
                   need_weights=True, grad_attn=True, noncontig=seed % 2 == 1, xscale=1.0, seed=seed)


@pytest.mark.skipif(not CUDA, reason="bfloat16 tl.dot returns garbage in the Triton CPU interpreter (known "
                                      "limitation), so real bfloat16 kernels are checked on a CUDA GPU only")
def test_bf16_gpu():
    for cfg in _bf16_configs():
        _compare_to_reference(cfg, torch.bfloat16)


@pytest.mark.skipif(CUDA, reason="interpreter-only check; test_bf16_gpu runs the real kernels")
def test_bf16_interpreter_data_path():
    """bfloat16 loads, casts, softmax and stores under the interpreter, with fp32 products.

    The interpreter's bf16 ``tl.dot`` is broken, so there (only) the ops pass UPCAST=True and
    the kernels multiply bf16 operands in fp32; everything else is the bfloat16 code path.
    """
    assert ops.INTERPRETED
    for cfg in _bf16_configs():
        _compare_to_reference(cfg, torch.bfloat16)


# ----------------------------------------------------------------------------- the module, compile, ops
def _no_compile_caches():
    """Inductor's FX-graph and AOT-autograd caches do not key on custom-op schemas: a cache
    written by an older version of the ops would replay stale calls, so tests bypass them."""
    return inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False)



def _loss_grads(call, module, x, eos):
    """out, attn and the gradients (x, every parameter) of sum(out^2) + sum(attn^2)."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    o, a = call(x, eos)
    (o.square().sum() + a.square().sum()).backward()
    return {"out": o.detach(), "attn": a.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def _twin(m, backend, dtype=None):
    """A module of ``m``'s configuration and weights (taken before any sharding) on ``backend``."""
    t = SparoReadout(m.dim, m.L, m.V, m.attn_dim, m.value_dim, m.num_heads, m.share_kv, backend=backend).to(DEV)
    t.load_state_dict(m.state_dict(), strict=True)
    return t if dtype is None else t.to(dtype)


def _check_all(got, want, pytorch, dtype, lengths, seed):
    """Every entry of ``want`` (float64: outputs, gradients) against ``got``, with ``pytorch`` (the
    torch backend at the same precision or under the same autocast) as PyTorch's own error."""
    assert got.keys() == want.keys() == pytorch.keys()
    for name, r in want.items():
        _check(name, got[name], r, pytorch[name], dtype, lengths[name], seed)


def _check_module(call, m, x, eos, seed):
    """A triton-backend module ``m`` (run through ``call``) against its float64 twin, with the torch
    backend at the same precision as PyTorch's own error (accuracy.py's criterion)."""
    ref, tor = _twin(m, "reference", torch.float64), _twin(m, "torch", x.dtype)
    want = _loss_grads(ref, ref, x.double(), eos)
    pytorch = _loss_grads(tor, tor, x, eos)
    got = _loss_grads(call, m, x, eos)
    ks = module_lengths(m, x)
    for name, r in want.items():
        if name == "k.bias" and not m.share_kv:
            assert torch.count_nonzero(got[name]) == 0
            continue
        _check(name, got[name], r, pytorch[name], x.dtype, ks[name], seed)
    return got


def test_module_shared_kv_matches_torch():
    torch.manual_seed(0)
    m = SparoReadout(24, 6, 5, 8, backend="triton").to(DEV)
    x = torch.randn(3, 10, 24, device=DEV)
    _check_module(m, m, x, None, seed="torch.manual_seed(0)")


def test_torch_compile():
    """torch.compile(fullgraph=True) of a triton-backend module, forward and backward.

    On the CPU the kernels run in the Triton interpreter: there the ops stay opaque to the
    compiler (interpreted kernels cannot be traced), so the compiled graph calls
    ``torch.ops.sparo_fast.readout_fwd/bwd``, which run the interpreted kernels; fullgraph=True
    proves there is no graph break. On a GPU Inductor traces into the Triton kernels.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SparoReadout(20, 4, 5, 6, 7, 2, False, backend="triton").to(DEV)
    x = torch.randn(3, 9, 20, device=DEV)
    eos = torch.tensor([0, 8, 4], device=DEV)
    cm = torch.compile(m, fullgraph=True)
    c1, c2 = _no_compile_caches()
    with c1, c2:
        _check_module(cm, m, x, eos, seed="torch.manual_seed(0)")


def _autocast_step(module, x, dtype, loss):
    """out, attn and every gradient (x, parameters) of ``loss(out, attn)``, the forward under autocast."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast(DEV.type, dtype=dtype):
        o, a = module(x)
    loss(o.float(), a.float()).backward()
    return {"out": o.detach(), "attn": a.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


def _float64_step(m, x, loss):
    """The same step on the float64 reference twin of ``m``."""
    r64 = _twin(m, "reference", torch.float64)
    x = x.detach().double().requires_grad_()
    o, a = r64(x)
    loss(o, a).backward()
    return {"out": o.detach(), "attn": a.detach(), "x": x.grad, **{n: p.grad for n, p in r64.named_parameters()}}


def test_autocast_module():
    """Under autocast (float16) the module hands the backend float16 tensors; grads reach fp32 params.

    Outputs and every gradient against the float64 twin with accuracy.py's criterion (the torch
    backend under the same autocast as PyTorch's error), and the fixed tolerances it began with."""
    dt = torch.float16
    torch.manual_seed(1)
    print("torch.manual_seed(1)")
    m = SparoReadout(16, 4, 6, 8, backend="triton").to(DEV)
    ref = _twin(m, "torch")
    x = torch.randn(2, 7, 16, device=DEV)
    loss = lambda o, a: o.sum()  # noqa: E731
    got, tor, want = _autocast_step(m, x, dt, loss), _autocast_step(ref, x, dt, loss), _float64_step(m, x, loss)
    assert got["out"].dtype == dt and got["attn"].dtype == dt
    assert m.k.weight.grad.dtype == torch.float32
    _check_all(got, want, tor, dt, module_lengths(m, x), "torch.manual_seed(1)")
    torch.testing.assert_close(got["out"], tor["out"], rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(m.proj.weight.grad, ref.proj.weight.grad, rtol=1e-2, atol=1e-2)


def test_fsdp2_mixed_precision(tmp_path):
    """FSDP2 (fully_shard, one gloo rank) with float16 parameters: the triton backend's outputs and
    grads against the float64 twin with accuracy.py's criterion (the torch backend under the same
    policy as PyTorch's error), and within the relative bound the test began with."""
    if CUDA or dist.is_initialized():
        pytest.skip("runs as a single-rank gloo group on the CPU")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        print("torch.manual_seed(0)")
        m = SparoReadout(20, 6, 5, 6, num_heads=3, backend="triton")
        r = _twin(m, "torch")
        policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
        x = torch.randn(3, 9, 20).half()
        loss = lambda o, a: o.float().square().sum() + a.float().square().sum()  # noqa: E731
        want, ks = _float64_step(m, x, loss), module_lengths(m, x)
        results = []
        for mod in (m, r):
            fully_shard(mod, mp_policy=policy)
            o, a = mod(x)
            assert o.dtype == torch.float16
            loss(o, a).backward()
            results.append({"out": o.detach(), "attn": a.detach(),
                            **{n: p.grad.full_tensor() for n, p in mod.named_parameters()}})
        want.pop("x")  # x is a float16 leaf without gradient here
        _check_all(results[0], want, results[1], torch.float16, ks, "torch.manual_seed(0)")
        for (name, p), q in zip(m.named_parameters(), r.parameters()):
            gp, gq = p.grad.full_tensor(), q.grad.full_tensor()
            assert float((gp - gq).norm()) <= 1e-2 * float(gq.norm()) + 1e-3, name
    finally:
        dist.destroy_process_group()


def test_op_schemas_match_annotations():
    """Older torch releases ignore ``schema=`` in ``triton_op`` and infer it from annotations."""
    for fn, schema in ((ops._readout_fwd, ops._FWD_SCHEMA), (ops._readout_bwd, ops._BWD_SCHEMA)):
        assert infer_schema(fn, mutates_args=()).replace("SymInt", "int") == schema


@pytest.mark.parametrize("shared", [True, False], ids=["shared_kv", "separate_kv"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("with_eos", [True, False])
def test_opcheck(need_weights, with_eos, shared):
    torch.manual_seed(0)
    B, N, D, H, S, A, V = 2, 5, 20, 2, 2, 6, 5
    L = H * S
    x = torch.randn(B, N, D, device=DEV, requires_grad=True)
    q = torch.randn(1, H, S, 1, A, device=DEV, requires_grad=True)
    kw, kb = torch.randn(H * A, D, device=DEV, requires_grad=True), torch.randn(H * A, device=DEV, requires_grad=True)
    if shared:
        vw, vb = kw, kb
    else:
        vw, vb = torch.randn(H * 7, D, device=DEV, requires_grad=True), torch.randn(H * 7, device=DEV, requires_grad=True)
    Vd = vw.shape[0] // H
    pw, pb = torch.randn(V, Vd, device=DEV, requires_grad=True), torch.randn(V, device=DEV, requires_grad=True)
    eos = torch.tensor([1, 4], device=DEV) if with_eos else None
    fwd_args = (x, eos, q, kw, kb, vw, vb, pw, pb, need_weights)
    torch.library.opcheck(torch.ops.sparo_fast.readout_fwd.default, fwd_args)
    out, attn, qt, lse, xp, o = torch.ops.sparo_fast.readout_fwd(*fwd_args)
    ga = torch.randn(B, L, N, device=DEV) if need_weights else None
    bwd_args = (torch.randn(B, L, V, device=DEV), ga, x.detach(), eos, q.detach(), kw.detach(), qt, vw.detach(),
                pw.detach(), lse, xp, o, shared)
    torch.library.opcheck(torch.ops.sparo_fast.readout_bwd.default, bwd_args)


def test_fallback_warns_once_and_matches():
    triton_backend._warned.clear()
    L = ops.MAX_SLOTS + 2
    torch.manual_seed(0)
    m = SparoReadout(8, L, 3, 4, num_heads=2, backend="triton").to(DEV)
    ref = SparoReadout(8, L, 3, 4, num_heads=2, backend="torch").to(DEV)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 5, 8, device=DEV)
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        o, a = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, a = m(x)  # second call: no warning
    o2, a2 = ref(x)
    assert torch.equal(o, o2) and torch.equal(a, a2)  # the fallback is the torch backend itself
    # float64 is not a kernel dtype either
    m64 = m.double()
    with pytest.warns(RuntimeWarning, match="float64"):
        m64(x.double())


def test_is_available():
    assert triton_backend.is_available(DEV)
    assert not triton_backend.is_available(torch.device("meta"))
    if not CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- GPU only
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: benchmark-size shapes are too slow for the "
                                          "Triton CPU interpreter")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_vit_b16(dtype):
    """vit_b16 shape (B=256, N=197, D=768, L=64, A=Vd=V=64) vs the float64 reference."""
    cfg = dict(B=256, N=197, D=768, H=64, S=1, A=64, Vd=64, V=64, share=True, eos=None,
               need_weights=True, grad_attn=True, noncontig=False, xscale=1.0, seed=0)
    x, eos, params, go, ga = _make(cfg, dtype, 0)
    args = (x, eos, params, go, ga, True, True)
    ref = _run(sparo_absorbed, *args, torch.float64, False)
    tri = _run(triton_backend.sparo_triton, *args, dtype, False)
    tor = _run(sparo_absorbed, *args, dtype, False)
    for name, r in ref.items():
        if name == "k.bias" and not cfg["share"]:  # shared: the bias's gradient is v's, nonzero
            assert torch.count_nonzero(tri[name]) == 0
            continue
        _check(name, tri[name], r, tor[name], dtype, _lengths(cfg)[name], cfg["seed"])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_large_tiled(dtype):
    """N >= 1024, D >= 1280, text mask, non-contiguous x, subheads, separate kv."""
    cfg = dict(B=3, N=1030, D=1290, H=5, S=4, A=24, Vd=40, V=33, share=False, eos="random",
               need_weights=True, grad_attn=True, noncontig=True, xscale=1.0, seed=1)
    _compare_to_reference(cfg, dtype)


@gpu
def test_gpu_compile_bf16():
    """torch.compile of the triton backend under bf16 autocast: outputs and every gradient against
    the float64 twin (accuracy.py's criterion, the torch backend under the same autocast as
    PyTorch's error), and the fixed tolerance the test began with."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    print("torch.manual_seed(0)")
    m = SparoReadout(64, 8, 16, 16, backend="triton").cuda()
    ref = _twin(m, "torch")
    x = torch.randn(4, 50, 64, device="cuda")
    loss = lambda o, a: o.float().square().sum()  # noqa: E731
    c1, c2 = _no_compile_caches()
    with c1, c2:
        got = _autocast_step(torch.compile(m, fullgraph=True), x, torch.bfloat16, loss)
    got = {k.replace("_orig_mod.", ""): v for k, v in got.items()}
    tor, want = _autocast_step(ref, x, torch.bfloat16, loss), _float64_step(m, x, loss)
    _check_all(got, want, tor, torch.bfloat16, module_lengths(m, x), "torch.manual_seed(0)")
    torch.testing.assert_close(got["out"].float(), tor["out"].float(), rtol=3e-2, atol=3e-2)
    assert m.q_emb.grad is not None and torch.isfinite(m.q_emb.grad).all()
