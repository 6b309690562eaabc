"""The latency-aware model (bench/latency_model.py) on synthetic launches with known answers."""
import latency_model as lm


def test_occupancy_waves_and_utilisation_of_a_known_launch():
    # 128 regs x 4 warps x 32 = 16,384 registers: 4 programs per SM; 64 kB shared: 3 per SM
    assert lm.resident(128, 4, 64 * 1024) == 3
    assert lm.resident(255, 8, 0) == 1 and lm.resident(300, 8, 0) == 0
    # 400 programs at 1 per SM: waves of 132, 132, 132, 4
    assert lm.waves(400, 1) == 4
    assert abs(lm.sm_utilisation(400, 1) - 400 / (4 * 132)) < 1e-12
    assert abs(lm.sm_utilisation(66, 2) - 0.5) < 1e-12  # half the SMs hold a program


def test_chain_bounds_a_launch_with_few_programs_and_long_loops():
    facts = {"config": {"BD": 32, "num_warps": 8, "num_stages": 1}, "regs": 249, "shared": 114688}
    dims = lm.Launch(B=256, N=197, D=768, L=64, H=64, S=1, VD=1, V=64, P=132)
    e = {"name": "_bwd_token_kernel"}
    out = lm.predict(e, 10e-6, dims, facts)
    # 132 programs, 1 per SM, 1 wave; 2 samples x 2 sweeps x 24 feature tiles = 96 trips of 1 us
    assert (out["grid_programs"], out["per_sm"], out["waves"], out["trips"]) == (132, 1, 1, 96)
    assert abs(out["latency_pred_us"] - (96 + 2)) < 1e-9
    # a pipelined loop divides the chain by num_stages; bandwidth / utilisation wins when larger
    assert abs(lm.chain_s(96, 3, True) - 32e-6) < 1e-15 and lm.chain_s(96, 3, False) == 96e-6
    assert abs(lm.predict(e, 200e-6, dims, facts)["latency_pred_us"] - 202) < 1e-9


def test_grid_table_matches_the_grids_the_kernels_launch():
    """Every kernel's grid in ``KERNELS`` equals the grid recorded at launch time (a tiny read-out
    under the interpreter, which launches the first config of each space)."""
    import os

    import pytest
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the launches are recorded under the Triton CPU interpreter")
    import math

    import torch

    import sparo_readout_bench as sb
    import traffic
    from sparo_fast_kernels import sparo_readout_autotune as at
    from sparo_fast_kernels import sparo_readout_bwd as bwd

    shape, B = sb.Shape("tiny", 8, 9, 32, True), 5
    dims = lm.Launch(B=B, N=shape.N, D=shape.D, L=sb.L_SLOTS, H=sb.NUM_HEADS, S=sb.L_SLOTS // sb.NUM_HEADS,
                     VD=sb.VALUE_DIM // sb.NUM_HEADS, V=sb.OUT_DIM, P=bwd.num_programs(B, torch.device("cpu")))
    M, f16 = dims.B * dims.S, torch.float16
    first = {"_fwd_fused_kernel": at.fused_space(dims.L, dims.N, dims.D, dims.VD, dims.V, f16),
             "_bwd_fused_kernel": at.bwd_fused_space(dims.L, dims.N, dims.D, dims.S, dims.A, dims.H, dims.VD,
                                                     dims.V, dims.B, f16),
             "_absorb_kernel": at.absorb_space(dims.S, dims.A, dims.D)}
    seen = set()
    for e in traffic.count(shape, "triton", "fwd_bwd", B):
        if e["kind"] == "kernel":
            programs, _, _ = lm.KERNELS[e["name"]](dims, first[e["name"]][0])
            assert programs == math.prod(e["grid"]), e["name"]
            seen.add(e["name"])
    assert seen == set(first)  # the split kernels' entries are for counts made before the fused ones


def test_persistent_forward_holds_one_program_per_sm_at_the_benchmark_shapes():
    """The fused forward launches at most one program per SM and the L2 count interleaves at most
    one per SM:
    both rest on every half-precision config compiled for the benchmark shapes, on every arch of
    the compile matrix, holding one program per SM (a second could not start until the first
    ended). A lighter config would make two per SM possible, and this test says so."""
    import json

    doc = json.loads(lm.MATRIX.read_text())
    rows = [(arch, r) for arch, rs in doc["versions"]["3.8.0"].items() for r in rs
            if r["kernel"] == "_fwd_fused_kernel" and r["dtype"] in ("fp16", "bf16") and r["fits"]
            and r["shape"] in ("vit_b16", "vit_b32", "text_b", "vit_l14")]
    assert len({a for a, _ in rows}) >= 5 and len(rows) >= 40
    held = {(a, r["shape"], r["dtype"], str(r["config"])): lm.resident(r["regs"], r["config"]["num_warps"], r["shared"])
            for a, r in rows}
    assert set(held.values()) == {1}, {k: v for k, v in held.items() if v != 1}
