"""The fused read-out in training: a few AdamW steps of the tiny SPARO CLIP with the ``triton`` backend
(real kernels, in the CPU interpreter when there is no GPU) against the same steps with the ``torch``
backend, through OpenCLIP's ClipLoss. Each step's loss and gradients are checked against a float64
model at the same weights: the fused error is at most twice PyTorch's own float32 error (plus a fixed
relative threshold), as for the kernels alone."""
import math

import pytest
import torch

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


def test_fused_training_steps_match_torch_backend(monkeypatch):
    calls = []
    real = triton_backend.sparo_triton
    monkeypatch.setattr(triton_backend, "sparo_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused = build("triton").to(dev)
    plain = build("torch").to(dev)
    ref64 = build("torch", torch.float64).to(dev)
    opt_f = torch.optim.AdamW(fused.parameters(), lr=1e-3, weight_decay=0.1)
    opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.1)
    losses_f, losses_p = [], []
    for step in range(STEPS):
        images = torch.randn(BATCH, 3, 64, 64, device=dev)
        texts = torch.randint(1, 49407, (BATCH, 32), device=dev)
        # the same weights in a float32 torch-backend copy and a float64 one: the fused step's error
        # against float64 must be at most twice the torch backend's own
        same32 = build("torch").to(dev)
        same32.load_state_dict(fused.state_dict())
        ref64.load_state_dict({k: v.double() for k, v in fused.state_dict().items()})
        n_calls = len(calls)
        loss_f, g_f = loss_and_grads(fused, images, texts)
        assert len(calls) > n_calls  # the fused kernels did run (both towers' read-outs)
        loss_t, g_t = loss_and_grads(same32, images, texts)
        loss_r, g_r = loss_and_grads(ref64, images, texts)
        assert abs(loss_f.item() - loss_r.item()) <= 2 * abs(loss_t.item() - loss_r.item()) + 1e-5 * abs(loss_r.item())
        assert g_f.keys() == g_r.keys()
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
