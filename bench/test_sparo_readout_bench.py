"""Read-out forward and forward+backward, every implementation side by side.

``pytest bench/`` times each case (pytest-benchmark) and writes ``bench/results/<device>.json``;
``pytest bench/ --benchmark-disable`` runs each case once on a tiny batch and checks its output
and gradients against the published math in float64, with the criterion of ``tests/accuracy.py``
(PyTorch's own error at the benchmark's dtype on the same inputs, or its floor).
"""
from __future__ import annotations

import itertools
import math
import os
import time

import pytest
import torch

import sparo_readout_bench as sb
from accuracy import absorbed_from_lse, assert_close, readout_lengths
from sparo_fast import SparoReadout
from sparo_fast import sparo_readout_triton as triton_backend
from sparo_fast.functional import sparo_absorbed, sparo_reference
from sparo_fast.params import ReadoutParams

# On a CPU smoke run each torch.compile costs seconds and the Triton interpreter runs every
# kernel program in Python: both are checked on one shape only (text_b, the one with the EOS
# mask; the interpreter on a tiny batch and token count, see sb.INTERPRETER_SMOKE). A timed run
# compiles every shape; tests/ covers the kernels themselves.
CPU_SMOKE_SLOW_SHAPES = ("text_b",)


class Case:
    """Parameters, rotating input buffers and the float64 reference for one shape."""

    def __init__(self, shape: sb.Shape, batch: int, n_tokens: int, device, dtype, n_sets: int):
        torch.manual_seed(0)
        self.shape, self.batch, self.N, self.device, self.dtype = shape, batch, n_tokens, device, dtype
        self.master = SparoReadout(shape.D, sb.L_SLOTS, sb.OUT_DIM, sb.ATTN_DIM, sb.VALUE_DIM,
                                   sb.NUM_HEADS, sb.SHARE_KV, need_weights=False).to(device, dtype)
        self.names, self.params = zip(*self.master.named_parameters())  # k/v shared: listed once
        gen = torch.Generator(device="cpu").manual_seed(1)

        def rand(*size):
            return torch.randn(*size, generator=gen).to(device, dtype)

        self.xs = [rand(batch, n_tokens, shape.D).requires_grad_() for _ in range(n_sets)]
        self.gs = [rand(batch, sb.L_SLOTS, sb.OUT_DIM) for _ in range(n_sets)]
        self.eos = [torch.randint(1, n_tokens, (batch,), generator=gen).to(device) if shape.eos else None
                    for _ in range(n_sets)]
        self.seed = "torch.manual_seed(0) for the weights, generator seed 1 for the inputs"
        self._ref = None
        self._pytorch = None

    def _run(self, fn, dtype) -> dict:
        """{"y": y, "x": dx, name: dparam} of ``fn`` on set 0, everything cast to ``dtype``."""
        x = self.xs[0].detach().to(dtype).requires_grad_()
        ps = {n: p.detach().to(dtype).requires_grad_() for n, p in zip(self.names, self.params)}
        args = [ps[n] for n in ("q_emb", "k.weight", "k.bias")]
        args += [ps["k.weight"], ps["k.bias"]] if sb.SHARE_KV else [ps["v.weight"], ps["v.bias"]]
        args += [ps["proj.weight"], ps["proj.bias"]]
        y, _ = fn(x, self.eos[0], ReadoutParams(*args), need_weights=False)
        grads = torch.autograd.grad(y, [x, *ps.values()], self.gs[0].to(dtype))
        return {"y": y.detach(), **dict(zip(("x", *ps), grads))}

    def reference(self) -> dict:
        """The published math in float64 on set 0."""
        if self._ref is None:
            self._ref = self._run(sparo_reference, torch.float64)
        return self._ref

    def pytorch(self) -> list:
        """PyTorch at the case's dtype on set 0: the published and the absorbed formulations, and
        the absorbed one with probabilities from the log-sum-exp (see ``tests/accuracy.py``)."""
        if self._pytorch is None:
            self._pytorch = [self._run(fn, self.dtype) for fn in (sparo_reference, sparo_absorbed, absorbed_from_lse)]
        return self._pytorch

    def lengths(self) -> dict:
        return readout_lengths(self.batch, self.N, self.shape.D, sb.L_SLOTS, sb.L_SLOTS // sb.NUM_HEADS,
                               sb.ATTN_DIM, sb.VALUE_DIM, sb.OUT_DIM)


_CASE: dict = {}


def get_case(env, shape: sb.Shape, batch: int, n_tokens: int) -> Case:
    key = (shape.name, batch, n_tokens)
    if key not in _CASE:
        _CASE.clear()  # one shape's buffers at a time
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        es = torch.empty((), dtype=env.dtype).element_size()
        per_set = (batch * n_tokens * shape.D + batch * sb.L_SLOTS * sb.OUT_DIM) * es
        n_sets = 1 if env.smoke else sb.rotation_count(per_set, env.device)
        _CASE[key] = Case(shape, batch, n_tokens, env.device, env.dtype, n_sets)
    return _CASE[key]


def make_impl(impl: str, case: Case, pass_: str = "fwd"):
    """A callable (x, eos) -> y [B, L, V] sharing the case's parameters (``infer``: the module
    in eval() mode, the inference path)."""
    base, _, compiled = impl.partition("+")
    if base in ("reference", "torch", "triton"):
        m = SparoReadout.from_published(case.master, backend=base, need_weights=False)
        m.check_inputs = False  # no host sync on eos_indices: the peers do not check either
        m.train(pass_ != "infer")
        if compiled:
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit across cases
            m = torch.compile(m, dynamic=False)
        return lambda x, eos: m(x, eos)[0]
    params = case.master.params()
    fn = {"sdpa": sb.sparo_sdpa, "xformers": sb.sparo_xformers}[base]
    return lambda x, eos: fn(x, eos, params)


def skip_reason(env, shape: sb.Shape, impl: str, pass_: str = "fwd") -> str | None:
    cpu_smoke_other_shape = (env.smoke and env.device.type == "cpu"
                             and shape.name not in CPU_SMOKE_SLOW_SHAPES)
    if pass_ == "infer" and impl in ("sdpa", "xformers"):
        return "infer: these peers have no eval() mode; their fwd rows are the same computation"
    if pass_ == "infer" and env.smoke and env.device.type == "cpu" and (
            impl.endswith("+compile") or shape.name not in CPU_SMOKE_SLOW_SHAPES):
        return ("smoke mode: the infer rows are checked on text_b without torch.compile (the reference and torch "
                "backends compute as in their fwd rows); a timed run runs them all")
    if impl.endswith("+compile") and cpu_smoke_other_shape:
        return ("smoke mode on CPU: torch.compile is checked on text_b only (seconds per "
                "compile on 2 cores); a timed run compiles every shape")
    if impl == "xformers":
        if env.device.type != "cuda":
            return "xformers: GPU only, and this run has no GPU"
        try:
            import xformers.ops  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"xformers does not import: {type(e).__name__}: {e}"
    if impl == "triton":
        try:
            usable = triton_backend.is_available(env.device)
        except Exception as e:  # noqa: BLE001
            return f"triton backend does not import: {type(e).__name__}: {e}"
        if not usable:
            return f"triton backend not available on {env.device.type} in this build"
        if env.device.type != "cuda" and not env.smoke:
            return "no GPU: the Triton interpreter is not a speed measurement"
        if cpu_smoke_other_shape:
            return ("smoke mode on CPU: the Triton interpreter is checked on a tiny text_b "
                    "shape only; tests/ covers the kernels")
    return None


def check(case: Case, f, pass_: str) -> None:
    """Output (and gradients) against the float64 reference with ``tests/accuracy.py``'s criterion."""
    want = case.reference()
    x, eos, g = case.xs[0], case.eos[0], case.gs[0]
    if pass_ in ("fwd", "infer"):
        with torch.no_grad():
            y = f(x, eos)
        got = {"y": y}
    else:
        y = f(x, eos)
        grads = torch.autograd.grad(y, [x, *case.params], g)
        got = {"y": y, **dict(zip(("x", *case.names), grads))}
    assert got["y"].shape == want["y"].shape and got["y"].dtype == case.dtype
    ks = case.lengths()
    for name, value in got.items():
        # a separate key bias only shifts every score of a slot: rounding-level on every side
        scale = float(want["x"].abs().max()) if name == "k.bias" and not sb.SHARE_KV else None
        assert_close(name, value, want[name], tuple(r[name] for r in case.pytorch()), dtype=case.dtype,
                     K=ks[name], seed=case.seed, scale=scale)


def make_step(case: Case, f, pass_: str):
    order = itertools.cycle(range(len(case.xs)))
    if pass_ in ("fwd", "infer"):
        def step():
            i = next(order)
            with torch.no_grad():
                return f(case.xs[i], case.eos[i])
    else:
        def step():
            i = next(order)
            y = f(case.xs[i], case.eos[i])
            return torch.autograd.grad(y, [case.xs[i], *case.params], case.gs[i])
    return step


def time_case(benchmark, env, step) -> dict:
    """Warm up (compiles happen here), size the rounds, time with pytest-benchmark."""
    dev = env.device
    gpu = dev.type == "cuda"
    for _ in range(10 if gpu else 2):
        step()
    sb.sync(dev)
    n_probe = 5 if gpu else 1
    t0 = time.perf_counter()
    for _ in range(n_probe):
        step()
    sb.sync(dev)
    t_call = max((time.perf_counter() - t0) / n_probe, 1e-7)
    # GPU: several calls per round, one sync at the end, so that the sync is not timed per call
    reps = max(1, math.ceil(2e-3 / t_call)) if gpu else 1
    rounds = int(min(100, max(10 if gpu else 5, math.ceil((1.0 if gpu else 2.0) / (reps * t_call)))))

    def one_round():
        for _ in range(reps):
            step()
        sb.sync(dev)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
    return {"median_ms": benchmark.stats.stats.median / reps * 1e3, "rounds": rounds, "reps": reps}


@pytest.mark.parametrize("pass_", sb.PASSES)
@pytest.mark.parametrize("impl", sb.IMPLS)
@pytest.mark.parametrize("shape_name", list(sb.SHAPES))
def test_readout(benchmark, bench_env, shape_name, impl, pass_):
    env = bench_env
    shape = sb.SHAPES[shape_name]
    dtype_name = str(env.dtype).replace("torch.", "")

    def skip(reason: str):  # recorded in the results file too
        env.skipped.append({"shape": shape.name, "dtype": dtype_name, "impl": impl, "pass": pass_,
                            "reason": reason})
        pytest.skip(reason)

    reason = skip_reason(env, shape, impl, pass_)
    if reason:
        skip(reason)
    batch, n_tokens = env.batch(shape), shape.N
    if impl == "triton" and env.device.type != "cuda":  # the interpreter, smoke only
        batch, n_tokens = sb.INTERPRETER_SMOKE["batch"], min(shape.N, sb.INTERPRETER_SMOKE["max_tokens"])
    case = get_case(env, shape, batch, n_tokens)
    if impl == "triton":  # the backend falls back to torch on inputs its kernels cannot take
        why = getattr(triton_backend, "unsupported_reason", lambda *a: None)(
            case.xs[0], case.master.q_emb, case.master.v.weight)
        if why:
            skip(f"the triton backend would fall back to the torch backend: {why}")
    f = make_impl(impl, case, pass_)
    check(case, f, pass_)  # outputs and gradients agree with the reference, in both modes
    step = make_step(case, f, pass_)
    benchmark.group = f"{shape.name} {pass_}"
    benchmark.extra_info.update(shape=shape.name, impl=impl, pass_=pass_, batch=batch)
    if env.smoke:
        benchmark(step)  # disabled: runs once
        return
    timing = time_case(benchmark, env, step)
    peak, _ = sb.peak_memory_bytes(step, env.device)
    bw, _ = env.bandwidth
    fb = sb.floor_bytes(shape, batch, env.dtype, pass_)
    floor_ms = fb / bw * 1e3
    row = {
        "shape": shape.name, "dtype": dtype_name, "impl": impl, "pass": pass_,
        "median_ms": round(timing["median_ms"], 5), "floor_ms": round(floor_ms, 5),
        "peak_mem_mb": round(peak / 2**20, 3) if peak is not None else None,
        "batch": batch, "N": shape.N, "D": shape.D, "eos": shape.eos,
        "ratio_to_floor": round(timing["median_ms"] / floor_ms, 2), "floor_bytes": fb,
        "rounds": timing["rounds"], "reps": timing["reps"],
        "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None, **env.tags(),
    }
    benchmark.extra_info.update({k: row[k] for k in ("median_ms", "floor_ms", "peak_mem_mb")})
    env.rows.append(row)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the traffic counter runs the kernels in the Triton CPU interpreter")
def test_infer_pass_is_two_launches():
    """``traffic.py``'s infer pass (eval() under no_grad, caches warm): the memset of the counters
    and the fused kernel, nothing else (no absorbed-query product), counts linear in the batch."""
    import traffic

    shape = sb.Shape("tiny", 8, 9, 32, True)
    infer = traffic.run_case(shape, "triton", "infer", batches=(2, 4), check=3)
    assert [e["name"] for e in infer["launch_detail"]] == ["aten.zeros", "_infer_kernel"]
    assert infer["check_max_rel_err"] < 1e-9
    assert infer["floor_bytes"] == sb.floor_bytes(shape, shape.B, traffic.DTYPE, "fwd")
