"""The traffic counter (bench/traffic.py): exact on kernels and ops of known traffic, and a
count of the real read-out at a tiny shape (CPU, Triton interpreter, a few seconds) whose
launches must be exactly those the op functions make (3 forward, 6 forward + backward)."""
import ast
import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the counter runs the kernels in the Triton CPU interpreter")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import sparo_readout_bench as sb  # noqa: E402
import traffic  # noqa: E402
from sparo_fast_kernels import sparo_readout_op as ops  # noqa: E402
from sparo_fast_kernels.testing import interpreter_trace as trace  # noqa: E402


@triton.jit
def _stencil_kernel(X, Y, n, BLOCK: tl.constexpr):
    """y[i] = x[i] + x[i + 1] (x has n + 1 elements): every x element but the ends is read twice."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.load(X + offs, mask=m, other=0.0)
    b = tl.load(X + offs + 1, mask=m, other=0.0)
    tl.store(Y + offs, a + b, mask=m)


def _count(fn):
    events = []
    with trace.listening(traffic._KernelEvents(trace, events)), traffic.TorchOpCounter(trace, events):
        fn()
    return events


def test_kernel_requested_and_distinct_bytes_are_exact():
    n = int(torch.randint(20, 300, ()).item())
    x, y = torch.randn(n + 1), torch.empty(n)
    (e,) = _count(lambda: _stencil_kernel[(triton.cdiv(n, 64),)](x, y, n, BLOCK=64))
    assert e["kind"] == "kernel" and e["name"] == "_stencil_kernel"
    assert e["load"] == 2 * 4 * n and e["store"] == 4 * n          # masked lanes excluded
    assert e["requested"] == 3 * 4 * n
    assert e["distinct_load"] == 4 * (n + 1) and e["distinct_store"] == 4 * n
    assert e["dram"] == 4 * (n + 1) + 4 * n
    assert e["programs"] == triton.cdiv(n, 64)
    assert e["grid"] == [triton.cdiv(n, 64), 1, 1]  # the launch grid, recorded at launch time


def test_torch_ops_count_inputs_and_outputs_and_skip_views():
    m, k, n = (int(v) for v in torch.randint(3, 40, (3,)))
    a, b = torch.randn(m, k, dtype=torch.float16), torch.randn(k, n, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    events = _count(lambda: (a.t().contiguous(), a @ b, (a @ b) + bias.expand(m, n), torch.empty(5)))
    names = [e["name"] for e in events]
    assert names == ["aten.clone", "aten.mm", "aten.mm", "aten.add"]  # t(), expand, empty: no traffic
    clone, mm, _, add = events
    assert clone["requested"] == 2 * 2 * m * k
    assert mm["requested"] == 2 * (m * k + k * n + m * n) and mm["flops"] == 2 * m * n * k
    assert add["requested"] == 2 * (m * n + n + m * n)  # the broadcast bias is read once


def test_copy_into_counts_the_destination_once():
    src, dst = torch.randn(37), torch.empty(37)
    (e,) = _count(lambda: dst.copy_(src))
    assert e["requested"] == 2 * 4 * 37


def test_fit_is_exact_for_linear_counts_and_rejects_changing_launches():
    a, b = (int(v) for v in torch.randint(1, 1000, (2,)))
    ev = lambda B: [{"name": "k", "kind": "kernel", **{f: a + b * B for f in traffic._FIELDS}}]  # noqa: E731
    (at,) = traffic.evaluate(traffic.fit([(2,), (4,)], [ev(2), ev(4)]), (256,))
    assert at["requested"] == a + 256 * b
    c = int(torch.randint(1, 1000, ()).item())
    ev2 = lambda B, P: [{"name": "k", "kind": "kernel", **{f: a + b * B + c * P for f in traffic._FIELDS}}]  # noqa
    pts = [(2, 1), (4, 2), (4, 4)]
    (at,) = traffic.evaluate(traffic.fit(pts, [ev2(*p) for p in pts]), (256, 132))
    assert at["requested"] == a + 256 * b + 132 * c
    with pytest.raises(RuntimeError, match="launch sequence changes"):
        traffic.fit([(2,), (4,)], [ev(2), ev(4) + ev(4)])


_TORCH_CALLS = {"torch.matmul": "aten.bmm", "torch.sum": "aten.sum", "torch.zeros": "aten.zeros"}


def _op_launches(function: str, tree=None) -> list:
    """The launches one op function of ``kernels/sparo_readout_op.py`` makes, read from its code in
    source order: every Triton kernel it names (``_..._kernel``), every ``torch.matmul`` and
    ``torch.sum`` it calls, and those of the module's ``launch_*`` helpers it calls; of an
    ``if fused_forward():`` only the branch the installed Triton takes."""
    tree = tree or ast.parse(Path(ops.__file__).read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    skipped = set()
    for n in ast.walk(funcs[function]):
        if isinstance(n, ast.If) and ast.unparse(n.test) == "fused_forward()":
            skipped |= {id(m) for b in (n.orelse if ops.fused_forward() else n.body) for m in ast.walk(b)}
        elif isinstance(n, ast.Lambda):  # a deferred call (the owner-count timing), not this call's launch
            skipped |= {id(m) for m in ast.walk(n.body)}
    nodes = sorted((n for n in ast.walk(funcs[function]) if hasattr(n, "lineno") and id(n) not in skipped),
                   key=lambda n: (n.lineno, n.col_offset))
    out, kernels = [], set()
    for n in nodes:
        if isinstance(n, ast.Name) and n.id.endswith("_kernel") and n.id not in kernels:
            kernels.add(n.id)
            out.append(n.id)
        elif isinstance(n, ast.Call) and ast.unparse(n.func) in _TORCH_CALLS:
            out.append(_TORCH_CALLS[ast.unparse(n.func)])
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.startswith("launch_") \
                and n.func.id in funcs:
            out += _op_launches(n.func.id, tree)
    return out


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_smoke_count_of_the_real_readout_at_a_tiny_shape(pass_):
    """The counted launches are exactly the op functions' launches: 3 forward (the absorbed query's
    kernel, the zero-filled work counter, the fused pool + projection kernel), 6 forward + backward
    (a work counter, the fused slot + token + finish kernel, the sum of its dq partials)."""
    shape = sb.Shape("tiny", 8, 9, 32, True)
    row = traffic.run_case(shape, "triton", pass_, batches=(2, 4), check=3)
    expected = _op_launches("_readout_fwd") + (_op_launches("_readout_bwd") if pass_ == "fwd_bwd" else [])
    assert [e["name"] for e in row["launch_detail"]] == expected
    assert row["launches"] == len(expected) == {"fwd": 3, "fwd_bwd": 6}[pass_]
    kernels = sum(name.endswith("_kernel") for name in expected)
    assert row["kernel_launches"] == kernels >= {"fwd": 2, "fwd_bwd": 3}[pass_]
    assert row["torch_ops"] == len(expected) - kernels
    assert row["check_max_rel_err"] < 1e-9  # counts are exactly linear in the batch
    assert row["launches"] == len(row["launch_detail"])
    assert row["requested"] >= row["dram"] > 0
    assert row["dram"] >= row["floor_bytes"] * 0.5
    assert row["h100_pred_us"] >= row["launches"] * traffic.H100["launch_s"] * 1e6


def _doc(label, date, requested, l2):
    row = {"shape": "vit_b16", "backend": "triton", "pass": "fwd_bwd", "batch": 256, "requested_x": requested,
           "dram_x": 1.8, "launches": 7, "h100_pred_x": 2.0,
           "l2": {"sizes": {"50MB": {"dram_x": l2, "flush": 0}}}}
    return {"label": label, "date": date, "rows": [row]}


def test_the_comparison_shows_both_counts_in_every_column_and_names_worse_cells():
    import traffic_render as tr
    lines = tr._compare([_doc("v2", "2026-01-01 00:00 UTC", 3.14, 2.32), _doc("v3", "2026-01-02 00:00 UTC", 3.5, 1.3)])
    header = lines[2]
    for col in ("requested / floor v2 | v3", "DRAM-level / floor v2 | v3", "DRAM L2 50MB / floor v2 | v3",
                "launches v2 | v3", "H100 model x floor (prediction) v2 | v3"):
        assert col in header
    row = lines[4]
    assert "3.14x | **3.50x**" in row and "2.32x | 1.30x" in row and "7 | 7" in row
    worse = [ln for ln in lines if ln.startswith("Worse in v3 than in v2")][0]
    assert "requested / floor (3.14x -> 3.50x)" in worse and "L2" not in worse
    target = [ln for ln in lines if ln.startswith("| vit_b16 fwd+bwd DRAM L2 50MB")][0]
    assert target.endswith("| 1.35x | 2.32x | 1.30x | in the count |")


def test_the_baseline_is_compared_with_the_latest_count():
    import traffic_render as tr
    docs = [_doc(lbl, f"2026-01-0{i} 00:00 UTC", 3.0, 2.0) for i, lbl in enumerate(("v1", "v2", "v3a", "v3b"), 1)]
    assert [d["label"] for d in tr.compared(docs)] == ["v2", "v3b"]
    assert [d["label"] for d in tr.compared(docs[:2])] == ["v1", "v2"]


def test_cli_passes_the_inference_fit_batches_and_rejects_unknown_passes(monkeypatch):
    """``--passes infer`` is fitted past the inference kernel's ring (``INFER_BATCHES``), the other
    passes at the small batches; an unknown pass is a one-line usage error."""
    seen = []

    def fake_run_case(shape, backend, pass_, batches, check):
        seen.append((pass_, tuple(batches), check))
        return {"requested_x": 1.0, "dram_x": 1.0, "launches": 1, "h100_pred_x": 1.0}

    monkeypatch.setattr(traffic, "run_case", fake_run_case)
    monkeypatch.setattr(traffic, "_write", lambda args, rows: Path("unused"))
    traffic.main(["--label", "t", "--backends", "triton", "--shapes", "text_b", "--passes", "infer,fwd"])
    assert seen == [("infer", traffic.INFER_BATCHES, traffic.INFER_CHECK), ("fwd", traffic.FIT_BATCHES,
                                                                             traffic.CHECK_BATCH)]
    with pytest.raises(SystemExit):
        traffic.main(["--label", "t", "--passes", "bogus"])
