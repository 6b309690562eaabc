"""Resume on a different world size: a 2-rank CPU run writes its end-of-epoch checkpoint; a 1-rank run
resumes it (DCP reshards the FSDP2 state) and its restored weights equal the saved ones, bit for bit."""
import os

import torch

from train_utils import MAIN, torchrun


def flags(tmp, name, *extra):
    return ["--device", "cpu", "--logs-dir", tmp, "--name", name, "--data-cache-dir", os.path.join(tmp, "dc"),
            "--synthetic-train-samples", "64", "--synthetic-val-samples", "16", "--synthetic-shard-size", "16",
            "--batch-size", "8", "--workers", "1", "--threads", "1", "--epochs", "1", "--warmup", "1",
            "--log-every-n-steps", "1", "--no-eval", *extra]


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from sparo_fast_training import checkpoint as ckpt

    tmp = str(tmp_path)
    torchrun(2, MAIN, flags(tmp, "two", "--no-export"))
    saved = ckpt.latest(os.path.join(tmp, "two", "checkpoints"))
    assert saved is not None and saved.endswith("step_00000004")  # 64 samples / (2 ranks x 8)
    res = torchrun(1, MAIN, flags(tmp, "one", "--resume", saved))
    assert "resumed from" in res.stdout + res.stderr
    restored = torch.load(os.path.join(tmp, "one", "checkpoints", "epoch_1.pt"), weights_only=False)["state_dict"]
    dcp_to_torch_save(saved, str(tmp_path / "saved.pt"))
    in_dcp = torch.load(tmp_path / "saved.pt", weights_only=False)["model"]
    assert restored.keys() == in_dcp.keys()
    for k, v in restored.items():
        assert v.dtype == in_dcp[k].dtype and torch.equal(v.reshape(-1), in_dcp[k].reshape(-1)), k
    # the saved weights are trained ones, not the initial weights that the 1-rank run built (same seed)
    from sparo_fast.clip import create_model

    torch.manual_seed(0)
    init = create_model("ViT-Tiny-SPARO").state_dict()
    assert sum(not torch.equal(v.reshape(-1), init[k].reshape(-1)) for k, v in restored.items() if k in init) > 10
