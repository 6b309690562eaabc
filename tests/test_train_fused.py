"""The fused read-out in training: a few AdamW steps of the tiny SPARO CLIP with the ``triton`` backend
(real kernels, in the CPU interpreter when there is no GPU) against the same steps with the ``torch``
backend, through OpenCLIP's ClipLoss. Each step's loss and gradients are checked against a float64
model at the same weights with ``accuracy.py``'s criterion, element by element: the fused error is at
most twice PyTorch's own float32 error (the torch backend at the same weights), or the criterion's floor
from float32's epsilon and the longest sum of the step (``longest_sum``), as for the kernels alone. A
TF32-level error in the read-out fails it (``test_tf32_readout_fails_the_criterion``)."""
import math

import pytest
import torch

from accuracy import assert_close, measure, model_lengths
from sparo_fast import sparo_readout_triton as triton_backend

pytestmark = pytest.mark.skipif(not triton_backend.is_available(torch.device("cpu")) and not torch.cuda.is_available(),
                                reason="Triton is not importable, or no CUDA device and TRITON_INTERPRET!=1")

STEPS, BATCH = 3, 4
# small towers keep the interpreter cheap; the read-out shapes are ViT-Tiny-SPARO's
OVERRIDE = {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}}


def build(backend, dtype=torch.float32):
    from sparo_fast.clip import create_model

    torch.manual_seed(0)
    model = create_model("ViT-Tiny-SPARO", backend=backend, override=OVERRIDE, output_dict=True)
    return model.to(dtype)


def loss_and_grads(model, images, texts):
    from open_clip import ClipLoss

    model.zero_grad(set_to_none=True)
    out = model(images.to(next(model.parameters()).dtype), texts)
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def err(a, ref):
    return float((a.double() - ref.double()).norm())


def longest_sum(model) -> int:
    """K of the accuracy floor: the longest sum in one step of ``model`` (a linear layer's width, the
    patch, or a batch of image or text tokens, which every weight gradient sums over)."""
    grid = model.visual.grid_size
    return model_lengths(model, BATCH * (grid[0] * grid[1] + 1), BATCH * model.context_length)


def check_step(fused, images, texts, seed, step, check=assert_close):
    """One step's loss and every gradient of ``fused`` against a float64 copy at the same weights,
    with a float32 torch-backend copy at the same weights as PyTorch's own error."""
    dev = images.device
    same32 = build("torch").to(dev)
    same32.load_state_dict(fused.state_dict())
    ref64 = build("torch", torch.float64).to(dev)
    ref64.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
    loss_f, g_f = loss_and_grads(fused, images, texts)
    loss_t, g_t = loss_and_grads(same32, images, texts)
    loss_r, g_r = loss_and_grads(ref64, images, texts)
    assert g_f.keys() == g_r.keys()
    K = longest_sum(fused)
    kw = dict(dtype=torch.float32, K=K, seed=f"{seed}, step {step}")
    checks = [check("loss", loss_f, loss_r, loss_t, **kw)]
    checks += [check(name, g_f[name], gr, g_t[name], **kw) for name, gr in g_r.items()]
    return (loss_f, g_f), (loss_t, g_t), (loss_r, g_r), checks


def test_fused_training_steps_match_torch_backend(monkeypatch):
    calls = []
    real = triton_backend.sparo_triton
    monkeypatch.setattr(triton_backend, "sparo_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    print("torch.manual_seed(0) (build), then torch.randn/randint for each step's batch")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused = build("triton").to(dev)
    plain = build("torch").to(dev)
    opt_f = torch.optim.AdamW(fused.parameters(), lr=1e-3, weight_decay=0.1)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.1)
    losses_f, losses_p = [], []
    for step in range(STEPS):
        images = torch.randn(BATCH, 3, 64, 64, device=dev)
        texts = torch.randint(1, 49407, (BATCH, 32), device=dev)
        n_calls = len(calls)
        (loss_f, g_f), (loss_t, g_t), (loss_r, g_r), _ = check_step(fused, images, texts, "torch.manual_seed(0)", step)
        assert len(calls) > n_calls  # the fused kernels did run (both towers' read-outs)
        # the bounds this test began with (norm-wise, a fixed relative floor): looser, still asserted
        assert abs(loss_f.item() - loss_r.item()) <= 2 * abs(loss_t.item() - loss_r.item()) + 1e-5 * abs(loss_r.item())
        for name, gr in g_r.items():
            slack = 1e-6 * math.sqrt(gr.numel())
            allowed = max(2 * err(g_t[name], gr), 1e-3 * float(gr.double().norm())) + slack
            assert err(g_f[name], gr) <= allowed, (step, name, err(g_f[name], gr), allowed)
        opt_f.step()
        losses_f.append(loss_f.item())
        # the independent torch-backend trajectory
        loss_p, _ = loss_and_grads(plain, images, texts)
        opt_p.step()
        losses_p.append(loss_p.item())
    # the two trajectories stay together (float32 round-off only) ...
    assert losses_f == pytest.approx(losses_p, rel=1e-3)
    # ... and the steps did train (the weights moved)
    moved = [n for (n, a), b in zip(fused.named_parameters(), build("triton").parameters()) if not torch.equal(a.cpu(), b)]
    assert len(moved) > 10


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 explicit mantissa bits, round to nearest even): what a TF32 tensor-core
    product does to its operands."""
    if t is None or not t.is_floating_point():
        return t
    bits = t.detach().float().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)
    return t + (rounded - t).detach()  # rounded forward, gradient passed through


def test_tf32_readout_fails_the_criterion(monkeypatch):
    """The criterion above is tight enough to catch a TF32 regression of the fused read-out: with
    its operands (tokens and parameters) rounded to TF32, as a TF32 product would round them, one
    step's checks fail, with errors far above the allowance."""
    real = triton_backend.sparo_triton

    def tf32_readout(x, eos, params, *a, **k):
        return real(_tf32(x), eos, type(params)(*map(_tf32, params)), *a, **k)

    monkeypatch.setattr(triton_backend, "sparo_triton", tf32_readout)
    torch.manual_seed(0)
    print("torch.manual_seed(0) (build), then torch.randn/randint for the batch")
    fused = build("triton")
    images, texts = torch.randn(BATCH, 3, 64, 64), torch.randint(1, 49407, (BATCH, 32))
    checks = check_step(fused, images, texts, "torch.manual_seed(0)", 0,
                        check=lambda *a, **k: measure(*a, log=False, **k))[-1]
    failed = [c for c in checks if not c.ok]
    print("TF32 read-out, measured/allowed:", {c.name: round(c.ratio, 1) for c in checks})
    assert len(failed) >= len(checks) // 2, [c.message() for c in failed]
    assert max(c.ratio for c in checks) > 10
