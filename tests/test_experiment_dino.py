"""DINO in miniature: the loss on known cases, k-NN, the probe, and a smoke run of --family dino."""
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from sparo_fast_experiment import dino as D
from train_utils import env


def _reference_loss(student, teacher, center, ts, tt, dtype=torch.float64):
    """Rewrite: mean over (i global teacher view, j student view, i != j) of sum_k -p_ik log q_jk."""
    total, terms = torch.zeros((), dtype=dtype), 0
    for i, t in enumerate(teacher):
        p = torch.softmax((t.detach().to(dtype) - center.to(dtype)) / tt, -1)
        for j, s in enumerate(student):
            if i != j:
                total = total + (-(p * torch.log_softmax(s.detach().to(dtype) / ts, -1)).sum(-1)).mean()
                terms += 1
    return float(total / terms)


def test_dino_loss_known_cases():
    K = 8
    zeros = [torch.zeros(3, K) for _ in range(4)]
    # uniform teacher and student: the cross-entropy is log K
    assert D.dino_loss(zeros, zeros[:2], torch.zeros(K), 0.1, 0.04).item() == pytest.approx(math.log(K), rel=1e-6)
    # a teacher whose centred logits pick class 0 sharply against a student that is uniform: still log K
    t = torch.zeros(3, K)
    t[:, 0] = 5.0
    assert D.dino_loss(zeros, [t, t], torch.zeros(K), 0.1, 0.04).item() == pytest.approx(math.log(K), rel=1e-6)
    seed = random.randrange(10**6)
    print("seed", seed)
    g = torch.Generator().manual_seed(seed)
    # ... and centring by those logits makes the target uniform again: the loss is the student's mean -log q
    s = [torch.randn(3, K, generator=g) for _ in range(3)]
    got = D.dino_loss(s, [t, t], t[0], 0.1, 0.04).item()
    nll = [(-torch.log_softmax(x.double() / 0.1, -1)).mean().item() for x in s]
    assert got == pytest.approx((nll[1] + nll[2] + nll[0] + nll[2]) / 4, rel=1e-5)
    student = [torch.randn(5, K, generator=g, requires_grad=True) for _ in range(4)]
    teacher = [torch.randn(5, K, generator=g, requires_grad=True) for _ in range(2)]
    center = torch.randn(K, generator=g)
    loss = D.dino_loss(student, teacher, center, 0.1, 0.04)
    want = _reference_loss(student, teacher, center, 0.1, 0.04)
    # float32 against float64: at most 2x the error of an independent float32 evaluation (at least 1 ulp)
    own = abs(_reference_loss(student, teacher, center, 0.1, 0.04, torch.float32) - want)
    assert abs(loss.item() - want) <= 2 * max(own, torch.finfo(torch.float32).eps * abs(want))
    loss.backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_knn_and_probe_on_separable_data():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(60) % 3
    x = centers[y] + torch.randn(60, 16, generator=g)
    q_y = torch.arange(30) % 3
    q = centers[q_y] + torch.randn(30, 16, generator=g)
    assert (D.knn_predict(x, y, q, 3, k=5) == q_y).all()
    assert (D.linear_probe(x, y, 3)(q) == q_y).all()
    # one neighbour: the query's own copy in the bank wins
    assert (D.knn_predict(x, y, x[:7], 3, k=1) == y[:7]).all()


def test_multicrop_views_and_determinism():
    imgs = torch.rand(3, 3, 64, 64)
    a = D.multicrop(imgs, 2, torch.Generator().manual_seed(1))
    b = D.multicrop(imgs, 2, torch.Generator().manual_seed(1))
    assert len(a) == 4 and all(v.shape == imgs.shape for v in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_experiment_dino_smoke(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, "-m", "sparo_fast_experiment.run", "--out", str(out), "--family", "dino", "--seeds", "0",
           "--steps", "2", "--batch-size", "4", "--n-items", "3", "--device", "cpu", "--threads", "1"]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "dino-sparo-s0: training 2 steps" in res.stdout and "dino-clip-s0: training 2 steps" in res.stdout
    table = (out / "table.md").read_text()
    assert "## DINO, budget 1" in table and "k-NN: held-out pairs" in table and "clip − sparo" in table
    ledger = json.loads((out / "results.json").read_text())
    entries = [e for e in ledger["entries"] if e["family"] == "dino"]
    assert sorted(e["model"] for e in entries) == ["clip", "sparo"]
    for e in entries:
        for k in ("knn_shape", "knn_color", "knn_pair", "knn_heldout_pair", "probe_heldout_pair"):
            assert 0.0 <= e["metrics"][k] <= 1.0
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "training" not in res.stdout and res.stdout.count("reusing") == 2
