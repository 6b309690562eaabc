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
