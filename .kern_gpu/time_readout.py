"""Time the SPARO read-out on the GPU (bf16, SPARO.md shapes): fwd (no_grad) and fwd+bwd."""
import sys, json, torch
from triton.testing import do_bench
from sparo_fast import SparoReadout
import sparo_fast_kernels, os
label = sys.argv[1]
SHAPES = [("vit_b32", 512, 50, 768), ("vit_b16", 256, 197, 768), ("text_b", 256, 77, 512), ("vit_l14", 128, 257, 1024)]
res = []
for name, B, N, D in SHAPES:
    for backend in (["triton", "torch"] if label == "new" else ["triton"]):
        torch.manual_seed(0)
        m = SparoReadout(D, 64, 64, 64, backend=backend).cuda().to(torch.bfloat16)
        x = torch.randn(B, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        eos = torch.randint(0, N, (B,), device="cuda") if name == "text_b" else None
        gy = torch.randn(B, 64, 64, device="cuda", dtype=torch.bfloat16)
        def fwd():
            with torch.no_grad():
                return m(x, eos, need_weights=False)
        params = [x] + list(m.parameters())
        def fb():
            y, _ = m(x, eos, need_weights=False)
            return torch.autograd.grad(y, params, gy)
        for _ in range(3):
            fwd(); fb()
        torch.cuda.synchronize()
        tf = do_bench(fwd, warmup=50, rep=300)
        tb = do_bench(fb, warmup=50, rep=300)
        floor = (B * N * D * 2 + 64 * 64 * D * 2 + B * 64 * 64 * 2) / 4.8e12 * 1e3
        r = dict(label=label, shape=name, backend=backend, fwd_ms=tf, fwd_bwd_ms=tb, fwd_floor_ms_4p8TBs=floor)
        print(json.dumps(r), flush=True)
        res.append(r)
