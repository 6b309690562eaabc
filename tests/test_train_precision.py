"""Precisions: the logit scale stays fp32 under every FSDP2 policy, OpenCLIP's amp (fp16 autocast with a
gradient scaler) trains, TF32 and bf16 capability as open_clip_train sets and needs them, --use-bn-sync's reason."""
import json
import math
import subprocess
import sys

import pytest
import torch

from train_utils import MAIN, env, shared_once, tiny_args


@pytest.mark.parametrize("precision", ["amp_bf16", "bf16", "pure_bf16"])
def test_logit_scale_stays_fp32_under_fsdp2(one_rank, precision):
    from sparo_fast.clip import create_model
    from sparo_fast_training import fsdp, optim
    from sparo_fast_training.loop import make_loss, train_step

    torch.manual_seed(0)
    model = create_model("ViT-Tiny", output_dict=True)
    fsdp.shard_model(model, torch.device("cpu"), 1, precision)
    pr = fsdp.PRECISIONS[precision]
    images, tokens = torch.randn(4, 3, 64, 64), torch.randint(1, 400, (4, 32))
    with torch.autocast("cpu", dtype=pr.autocast, enabled=pr.autocast is not None):
        out = model(images, tokens)
    want = torch.tensor(math.log(1 / 0.07), dtype=torch.float32).exp()  # 14.2857 (bf16 would give 14.25)
    assert out["logit_scale"].dtype == torch.float32 and torch.equal(out["logit_scale"].reshape(()), want)
    assert model.logit_scale.dtype == torch.float32 and not hasattr(model.logit_scale, "full_tensor")
    opt = optim.create_optimizer(model, lr=1e-3, wd=0.1)
    loss, gnorm = train_step(model, [(images, tokens)], make_loss(False, False, 0, 1), opt, 1.0, autocast=pr.autocast)
    assert torch.isfinite(loss) and torch.isfinite(gnorm) and model.logit_scale.grad is not None
    assert model.logit_scale.dtype == torch.float32 and model.logit_scale.item() != want.log().item()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(shared_once(tmp_path_factory, "data_cache", lambda d: None))


def test_amp_trains_with_a_grad_scaler(tmp_path, cache):
    res = subprocess.run([sys.executable, str(MAIN)] + [str(a) for a in tiny_args(
        tmp_path, "amp", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "1", "--max-steps", "3",
        "--precision", "amp")], env=env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "amp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    blob = torch.load(tmp_path / "amp" / "checkpoints" / "step_3.pt", weights_only=True)
    assert blob["scaler"]["scale"] > 0 and "precision amp" in res.stdout


def test_tf32_and_bf16_capability_as_open_clip_train(monkeypatch):
    from sparo_fast_training import trainer
    from sparo_fast_training.errors import Fatal

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        trainer.backend_flags(torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        trainer.backend_flags(torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = old
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    for p in ("amp_bf16", "bf16", "pure_bf16"):
        with pytest.raises(Fatal, match="V100 does not support bf16; use --precision amp"):
            trainer.check_precision(p, torch.device("cuda"))
    trainer.check_precision("amp", torch.device("cuda"))
    trainer.check_precision("fp32", torch.device("cuda"))


def test_bn_sync_reason_is_true():
    """RN towers build here with BatchNorm: the reason must not claim there is none."""
    from sparo_fast.clip import create_model
    from sparo_fast_training import configs

    model = create_model("RN50")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert "BatchNorm statistics of an RN tower" in configs.REFUSED["--use-bn-sync"]
