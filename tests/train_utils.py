"""Shared helpers of the trainer tests: run ``torchrun`` in a subprocess, CPU-only and quiet."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "training" / "main.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def env(extra=None):
    e = dict(os.environ)
    e.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    e.update(extra or {})
    return e


def torchrun(nproc, script, args, timeout=300, extra_env=None, check=True):
    cmd = TORCHRUN + [f"--nproc_per_node={nproc}", str(script)] + [str(a) for a in args]
    res = subprocess.run(cmd, env=env(extra_env), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def tiny_args(tmp, name, cache, *extra):
    """Common trainer flags: tiny synthetic set, tiny batches, few steps, CPU."""
    return ["--device", "cpu", "--logs-dir", tmp, "--name", name, "--data-cache-dir", cache,
            "--synthetic-train-samples", "384", "--synthetic-val-samples", "64", "--batch-size", "8",
            "--workers", "1", "--log-every-n-steps", "1", "--threads", "1", *extra]


def shared_once(tmp_path_factory, name, build):
    """Run ``build(dir)`` once per pytest run, even across pytest-xdist workers (file lock + marker)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one pytest run
    target = root / f"shared_{name}"
    with FileLock(str(target) + ".lock"):
        if not (target / ".done").is_file():
            target.mkdir(parents=True, exist_ok=True)
            build(target)
            (target / ".done").write_text("ok")
    return target


def float64_clip_step(model_name, images, tokens):
    """One step's loss and gradients of ``model_name`` (seed 0 init, as the trainer tests build it) in
    float64 on the global batch, without the optimizer step, K of accuracy.py's floor for them, and
    ``terms=`` for the cancelling ones (the logit scale's).
    ``loop.train_step`` computes its loss in float32, so the step is written out here."""
    import torch

    from accuracy import model_lengths
    from sparo_fast.clip import create_model
    from sparo_fast_training.loop import make_loss

    torch.manual_seed(0)
    model = create_model(model_name, fused=False, output_dict=True).double()
    out = model(images.double(), tokens)
    loss = make_loss(False, False, 0, 1)(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    n, grid = images.shape[0], model.visual.grid_size
    K = model_lengths(model, n * (grid[0] * grid[1] + 1), n * tokens.shape[1])
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, K, {"logit_scale": _logit_scale_terms(out, grads["logit_scale"])}


def _logit_scale_terms(out, grad) -> float:
    """The magnitude of the terms of the (log) logit scale's gradient ``sum_ij G_ij logits_ij``, G the
    contrastive loss's gradient by the logits: a softmax gradient, so the sum cancels (``sum_j G_ij = 0``)
    and its rounding follows the terms (accuracy.py, "Cancelling results")."""
    import torch

    with torch.no_grad():
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
        eye = torch.eye(logits.shape[0], dtype=logits.dtype)
        G = (logits.softmax(-1) - eye + (logits.t().softmax(-1) - eye).t()) / (2 * logits.shape[0])
        terms = float((G.abs() * logits.abs()).sum())
        assert abs(float((G * logits).sum()) - float(grad)) <= 1e-9 * terms  # G is the loss's own gradient
    return terms
