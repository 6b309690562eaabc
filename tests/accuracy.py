"""One accuracy criterion for every numeric comparison in ``tests/`` and ``bench/``.

A result ``got`` computed at some precision is compared element by element with a float64
reference ``ref``, the way FlashAttention's tests compare their kernels:

    err      = max |got - ref|                          (the worst element)
    pytorch  = 2 * max |pytorch - ref|                  PyTorch's own error at the same precision,
                                                        on the same inputs, doubled
    floor    = FLOOR_C * max(eps(dtype), eps(acc) * sqrt(K)) * scale
                                                        K: the longest reduction behind the result,
                                                        acc: the accumulation dtype (float32 for
                                                        float16/bfloat16), scale: max |ref|, or
                                                        max |terms| (below)
    allowed  = max(pytorch, floor)  (at most ``cap``)

``pytorch`` is the measure of how hard this particular result is to compute at that precision
(a softmax gradient that cancels, a saturated softmax). Where a test passes several PyTorch
results the worst counts: e.g. the published formulation, the absorbed one, and the absorbed one
with its probabilities taken from the log-sum-exp as the kernels' backward recomputes them
(``2^(s log2(e) - lse2)`` carries an error of about eps x |s| that a normalised softmax does not).
``floor`` only keeps a lucky PyTorch result (exact by chance, e.g. a sum of a few representable
numbers) from demanding more than a reduction of length K accumulated at ``acc`` can give, or,
in half precision, more than a few roundings to the output's own precision. ``cap`` keeps a fixed tolerance that a test
had before: the allowance never grows past it.

**Cancelling results** (``terms=``). A rounding error is proportional to the size of the terms a
result is summed from, not to the result: the forward-error bound of a sum of products is
``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_K * sum |a_i| |b_i|``. Where the terms nearly cancel
(the query gradient ``sum_n gs_n k_n`` with ``sum_n gs_n = 0`` and keys dominated by their bias;
the key-bias gradient, zero in exact arithmetic) max|ref| is far below that size, and a floor
scaled by it demands more than any evaluation order can give: it failed on such query gradients.
``terms`` passes the magnitude of the terms instead (a tensor shaped like ``ref``, or a number);
the floor is then scaled by its largest element. :func:`readout_magnitudes` computes it for every
result of the read-out: a first-order forward-error bound in units of eps (a running error
analysis of the published computation and its backward at the float64 values: a sum of products
whose factors carry errors ``e_a``, ``e_b`` gets ``sum |a||b| + e_a |b| + |a| e_b``; the softmax and
its gradient carry the errors of the scores and of ``gp - sum p gp``). The magnitude of the terms
alone at the last sum is not enough: the softmax gradient ``gs = p (gp - sum p gp)`` cancels too
(exactly zero for a single valid token), and its error reaches every gradient after it. The bound
is never below max|ref|, so only cancelling results get a larger floor, and only as large as their
own terms justify; being a worst-case bound it is loose (the float64 property tests measure 1-8% of
it), but it never fails by luck. Where there is no independent PyTorch result (float64 against
float64, as in the property tests), this floor is the whole allowance.

Every check returns a :class:`Check`; a failure's message carries the seed, the measured error,
the allowance, both terms and which one bound. With ``SPARO_ACCURACY_LOG=path`` set, every check
appends one JSON line to ``path`` (safe under ``pytest -n``: one ``write`` per line, append mode);
``python tests/accuracy.py path`` summarises a log per dtype: the largest ratio measured/allowed
and how often the floor was the binding term.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from unittest import mock

import torch

from sparo_fast import functional
from sparo_fast.params import ReadoutParams

# The floor's constant. A reduction of K products rounded once per addition has an error of
# about eps * sqrt(K) * (the size of the terms) for random-signed rounding errors; 3 leaves
# room for the handful of further roundings (scale, exp, the output cast) around it.
FLOOR_C = 3.0
LOG_ENV = "SPARO_ACCURACY_LOG"
LOG2E = math.log2(math.e)


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision products are accumulated in float32 (the kernels' dots, PyTorch's matmuls)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def floor(dtype: torch.dtype, K: int, scale: float) -> float:
    """The floor of the allowance (see the module docstring)."""
    return FLOOR_C * max(eps(dtype), eps(accumulation_dtype(dtype)) * math.sqrt(max(K, 1))) * scale


@dataclass
class Check:
    """One comparison: what was measured and what was allowed."""

    name: str
    dtype: str
    seed: object
    err: float
    pytorch: float  # 2 x PyTorch's own error (0 when there is no PyTorch result)
    floor: float
    allowed: float
    bound: str  # the binding term: "pytorch", "floor" or "cap"
    scale: float
    K: int
    test: str = ""
    scale_of: str = "max|ref|"  # what scaled the floor: "max|ref|", "max|terms|" or "given"

    @property
    def ratio(self) -> float:
        if self.allowed > 0:
            return self.err / self.allowed
        return 0.0 if self.err == 0 else math.inf

    @property
    def ok(self) -> bool:
        return self.err <= self.allowed

    def message(self) -> str:
        return (f"{self.name}: error {self.err:.3e} > allowed {self.allowed:.3e} ({self.bound} bound; "
                f"2 x PyTorch's error {self.pytorch:.3e}, floor {self.floor:.3e} = {FLOOR_C:g} x max(eps, "
                f"eps(acc) x sqrt({self.K})) x {self.scale_of} {self.scale:.3e}; {self.dtype}, seed {self.seed})")


def _max_abs_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - ref).abs().max())


def measure(name: str, got: torch.Tensor, ref: torch.Tensor, pytorch=None, *, dtype: torch.dtype, K: int,
            seed, scale: float | None = None, cap: float | None = None, terms=None, log: bool = True) -> Check:
    """Measure ``got`` against the float64 ``ref`` (see the module docstring) without asserting.

    ``pytorch``: PyTorch's result at ``dtype`` on the same inputs, a tuple of such results (the
    worst counts: e.g. the absorbed and the published formulations), or None (floor only).
    ``scale`` replaces max|ref| where the reference is zero by cancellation; ``terms``: the
    magnitude of the terms each element is summed from (see "Cancelling results" above; e.g. an
    entry of :func:`readout_magnitudes`), whose largest element then scales the floor; ``cap`` is
    an absolute tolerance never to exceed; ``log=False`` keeps a check that is meant to fail (a
    test of the criterion itself) out of the ``SPARO_ACCURACY_LOG`` record.
    """
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values (seed {seed})")
    ref = ref.detach().double()
    if scale is not None and terms is not None:
        raise ValueError(f"{name}: pass scale or terms, not both")
    scale_of = "given" if scale is not None else "max|terms|" if terms is not None else "max|ref|"
    if terms is not None:
        terms = torch.as_tensor(terms, dtype=torch.float64)
        if terms.dim() and terms.shape != ref.shape:
            raise ValueError(f"{name}: terms of shape {tuple(terms.shape)} for a result of shape {tuple(ref.shape)}")
        scale = float(terms.abs().max()) if terms.numel() else 0.0
    elif scale is None:
        scale = float(ref.abs().max()) if ref.numel() else 0.0
    if pytorch is None:
        pytorch = ()
    elif isinstance(pytorch, torch.Tensor):
        pytorch = (pytorch,)
    torch_term = 2.0 * max((_max_abs_diff(t, ref) for t in pytorch), default=0.0)
    fl = floor(dtype, K, scale)
    allowed, bound = (torch_term, "pytorch") if torch_term >= fl else (fl, "floor")
    if cap is not None and cap < allowed:
        allowed, bound = cap, "cap"
    check = Check(name, str(dtype).replace("torch.", ""), seed, _max_abs_diff(got, ref), torch_term, fl,
                  allowed, bound, scale, int(K), os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], scale_of)
    if log:
        _log(check)
    return check


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, pytorch=None, *, dtype: torch.dtype, K: int,
                 seed, scale: float | None = None, cap: float | None = None, terms=None) -> Check:
    """:func:`measure`, then fail with the full account if the error exceeds the allowance."""
    check = measure(name, got, ref, pytorch, dtype=dtype, K=K, seed=seed, scale=scale, cap=cap, terms=terms)
    assert check.ok, check.message()
    return check


def readout_lengths(B: int, N: int, D: int, L: int, S: int, A: int, Vd: int, V: int) -> dict:
    """``K`` for each result of the read-out (outputs and gradients by parameter name): the
    longest sum it depends on.

    Every result goes through the forward's sums (scores over D and A, softmax and pooling
    over N, the value projection over D, the output projection over Vd); gradients add the
    slot sum of dx (L), go = g W_O (V) and the batch sums of the weight gradients."""
    fwd = max(N, D, A, Vd)
    bwd = max(fwd, L, V)
    return {"out": fwd, "y": fwd, "attn": max(N, D, A), "x": bwd, "q_emb": max(bwd, B * N),
            "k.weight": max(bwd, B * N), "k.bias": max(bwd, B * N), "v.weight": max(bwd, B * S),
            "v.bias": max(bwd, B * S), "proj.weight": max(fwd, B * L), "proj.bias": B * L}


def model_lengths(model, *batch_sums: int) -> int:
    """``K`` for every result of a whole model's step (outputs, loss, gradients): its longest sum,
    the largest of a linear layer's input or output width (forward, input gradient), a
    convolution's patch and ``batch_sums`` (the tokens a weight gradient sums over, e.g.
    batch x sequence length for each tower)."""
    sizes = list(batch_sums)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            sizes += [mod.in_features, mod.out_features]
        elif isinstance(mod, torch.nn.Conv2d):
            sizes.append(mod.in_channels * math.prod(mod.kernel_size))
        elif isinstance(mod, torch.nn.MultiheadAttention) and mod.in_proj_weight is not None:
            sizes += list(mod.in_proj_weight.shape)  # the packed q/k/v projection
    return max(sizes)


def _product_error(spec: str, a, e_a, b, e_b) -> torch.Tensor:
    """First-order error (units of eps) of ``einsum(spec, a, b)`` whose factors carry errors e_a, e_b:
    ``sum |a||b|`` (the sum's own rounding) ``+ e_a |b| + |a| e_b`` (no e_a e_b: second order)."""
    return torch.einsum(spec, a.abs() + e_a, b.abs()) + torch.einsum(spec, a.abs(), e_b)


def _softmax_error(p: torch.Tensor, e_s: torch.Tensor) -> torch.Tensor:
    """First-order error of p = softmax(s) (units of eps) from errors e_s of the scores:
    ``dp_n = p_n ((1 - p_n) ds_n - sum_{m != n} p_m ds_m)`` (a shift common to every score cancels),
    plus one rounding of p_n itself."""
    return p * (1 + (1 - p) * e_s + ((p * e_s).sum(-1, keepdim=True) - p * e_s))


def _readout_forward_errors(x, eos_indices, params):
    """Values and first-order error bounds (units of eps) of the forward's intermediates."""
    q, wk, bk, wv, bv, wo, bo = (t.detach().double() for t in params)
    B, N, _ = x.shape
    _, H, S, _, A = q.shape
    f = dict(c=A ** -0.5, q=q.view(H, S, A), wk=wk, wv=wv, wo=wo, x=x)
    ax = x.abs()
    f["k"], f["e_k"] = (x @ wk.t() + bk).view(B, N, H, A), (ax @ wk.abs().t() + bk.abs()).view(B, N, H, A)
    f["v"], f["e_v"] = (x @ wv.t() + bv).view(B, N, H, -1), (ax @ wv.abs().t() + bv.abs()).view(B, N, H, -1)
    e_s = f["c"] * torch.einsum("hsa,bnha->bhsn", f["q"].abs(), f["k"].abs() + f["e_k"])
    p = functional.sparo_reference(x, eos_indices, ReadoutParams(q, wk, bk, wv, bv, wo, bo))[1].view(B, H, S, N)
    if eos_indices is not None:  # masked tokens: p = 0 exactly
        e_s = e_s.masked_fill(functional.eos_mask(eos_indices, N, x.device)[:, None, None, :], 0.0)
    f["p"], f["e_p"] = p, _softmax_error(p, e_s)
    f["pool"] = torch.einsum("bhsn,bnhv->bhsv", p, f["v"]).reshape(B, H * S, -1)
    f["e_pool"] = _product_error("bhsn,bnhv->bhsv", p, f["e_p"], f["v"], f["e_v"]).reshape(B, H * S, -1)
    f["e_out"] = (f["pool"].abs() + f["e_pool"]) @ wo.abs().t() + bo.abs()
    return f


def readout_magnitudes(x, eos_indices, params, g_out=None, g_attn=None, share_kv=False) -> dict:
    """The magnitude of the terms behind every result of the read-out (see "Cancelling results"):
    a first-order forward-error bound in units of eps (a running error analysis of the published
    computation and its backward for the loss ``sum(out * g_out) + sum(attn * g_attn)``, at the
    float64 values): a sum of products ``sum a_i b_i`` whose factors carry errors ``e_a``, ``e_b``
    gets ``sum |a_i| |b_i| + e_a |b_i| + |a_i| e_b``; a softmax, ``_softmax_error``. So
    ``dq = sum_n gs_n k_n / sqrt(A)`` is held to the size of its terms ``|gs_n| |k_n|``, not to its
    own value, and errors of the scores (eps x |s|, relative in p) reach every gradient.
    Returns float64 tensors shaped like the results, keyed as :func:`readout_lengths` (``v.*``
    folded into ``k.*`` when ``share_kv``: one parameter, one gradient); ``out`` and ``attn`` only
    when ``g_out`` is None."""
    f = _readout_forward_errors(x.detach().double(), eos_indices, params)
    c, q, k, v, p, e_p, B, N = f["c"], f["q"], f["k"], f["v"], f["p"], f["e_p"], *f["x"].shape[:2]
    H, S, A = q.shape
    out = {"out": f["e_out"], "attn": e_p.reshape(B, H * S, N)}
    if g_out is None:
        return out
    g_out = g_out.detach().double()
    g_pool, e_gpool = (g_out @ f["wo"]).view(B, H, S, -1), (g_out.abs() @ f["wo"].abs()).view(B, H, S, -1)
    g_p = torch.einsum("bhsv,bnhv->bhsn", g_pool, v)
    e_gp = _product_error("bhsv,bnhv->bhsn", g_pool, e_gpool, v, f["e_v"])
    if g_attn is not None:
        g_p, e_gp = g_p + g_attn.detach().double().view(B, H, S, N), e_gp + g_attn.detach().double().abs().view(B, H, S, N)
    r, e_r = (p * g_p).sum(-1, keepdim=True), ((p + e_p) * g_p.abs() + p * e_gp).sum(-1, keepdim=True)
    g_s = p * (g_p - r)
    e_gs = p * (g_p.abs() + r.abs() + e_gp + e_r) + e_p * (g_p - r).abs()
    m_gs = g_s.abs() + e_gs
    d_k, e_dk = [(c * torch.einsum("bhsn,hsa->bnha", t, q.abs() if i else q)).reshape(B, N, H * A)
                 for i, t in enumerate((g_s, m_gs))]
    d_v = torch.einsum("bhsn,bhsv->bnhv", p, g_pool).reshape(B, N, -1)
    e_dv = _product_error("bhsn,bhsv->bnhv", p, e_p, g_pool, e_gpool).reshape(B, N, -1)
    m_dk, m_dv, ax, ag = (d_k.abs() + e_dk).flatten(0, 1), (d_v.abs() + e_dv).flatten(0, 1), f["x"].abs(), g_out.abs()
    out.update({
        "x": (m_dk @ f["wk"].abs() + m_dv @ f["wv"].abs()).view(B, N, -1),
        "q_emb": c * _product_error("bhsn,bnha->hsa", g_s, e_gs, k, f["e_k"]).view(1, H, S, 1, A),
        "k.weight": m_dk.t() @ ax.flatten(0, 1), "k.bias": m_dk.sum(0),
        "v.weight": m_dv.t() @ ax.flatten(0, 1), "v.bias": m_dv.sum(0),
        "proj.weight": torch.einsum("blv,bld->vd", ag, f["pool"].abs() + f["e_pool"]), "proj.bias": ag.sum((0, 1)),
    })
    if share_kv:
        out["k.weight"] = out["k.weight"] + out.pop("v.weight")
        out["k.bias"] = out["k.bias"] + out.pop("v.bias")
    return out


def _softmax_from_lse(scores, dim=-1, dtype=None):
    """``2^(s log2(e) - lse2)``: the probabilities as the kernels' backward recomputes them (base 2)."""
    scores = scores if dtype is None else scores.to(dtype)
    lse2 = torch.logsumexp(scores, dim, keepdim=True) * LOG2E
    return torch.exp2(scores * LOG2E - lse2)


def absorbed_from_lse(x, eos_indices, params, need_weights=True):
    """The absorbed formulation in PyTorch ops with its probabilities taken from the log-sum-exp,
    as the Triton backward recomputes them: one of the PyTorch results whose error the kernels
    are held to (``2^(s log2(e) - lse2)`` carries an error of about eps x |s| that a normalised
    softmax does not)."""
    with mock.patch.object(functional.torch, "softmax", _softmax_from_lse):
        return functional.sparo_absorbed(x, eos_indices, params, need_weights)


def module_lengths(module, x: torch.Tensor) -> dict:
    """:func:`readout_lengths` for a ``SparoReadout`` (or published-layout module) applied to x."""
    B, N, D = x.shape
    return readout_lengths(B, N, D, module.L, module.L // module.num_heads, module.attn_dim, module.value_dim,
                           module.proj.weight.shape[0])


def _log(check: Check) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({**asdict(check), "seed": str(check.seed), "ratio": check.ratio}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def summarize(lines) -> dict:
    """Per dtype: number of checks, largest ratio measured/allowed (and where), floor-bound count."""
    out: dict = defaultdict(lambda: {"checks": 0, "max_ratio": 0.0, "where": "", "floor_bound": 0,
                                     "pytorch_bound": 0, "cap_bound": 0, "max_err_in_eps": 0.0})
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        s = out[r["dtype"]]
        s["checks"] += 1
        s[f"{r['bound']}_bound"] += 1
        if r["ratio"] > s["max_ratio"]:
            s["max_ratio"], s["where"] = r["ratio"], f"{r['test']} {r['name']} (seed {r['seed']})"
        if r["scale"] > 0:  # the error in units of eps x max|ref|
            in_eps = r["err"] / (eps(getattr(torch, r["dtype"])) * r["scale"])
            s["max_err_in_eps"] = max(s["max_err_in_eps"], in_eps)
    return dict(out)


def main(argv=None) -> int:
    paths = (argv if argv is not None else sys.argv[1:]) or [os.environ.get(LOG_ENV, "")]
    lines = []
    for p in paths:
        with open(p) as f:
            lines += f.readlines()
    for dtype, s in sorted(summarize(lines).items()):
        print(f"{dtype:9s} checks {s['checks']:5d}  max measured/allowed {s['max_ratio']:.3f}  "
              f"floor binds {s['floor_bound']}/{s['checks']}  pytorch binds {s['pytorch_bound']}  "
              f"cap binds {s['cap_bound']}  max error {s['max_err_in_eps']:.1f} eps x max|ref|")
        print(f"          worst: {s['where']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
