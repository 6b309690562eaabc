"""OpenCLIP's formats both ways: this trainer's ``epoch_N.pt`` in open_clip_train's layout (optimizer state
included) resumes on two FSDP2 ranks and round-trips exactly; open_clip_train continues it and this trainer
continues open_clip_train's file; ``--pretrained`` from a .safetensors file and from ``hf-hub:`` in a local
Hugging Face cache (offline)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from train_utils import MAIN, env, shared_once, tiny_args, torchrun

OC_PATH = os.environ.get("OPEN_CLIP_TRAIN_DEPS", "/tmp/oc_target")  # pandas (+ webdataset 0.2.x) for open_clip_train


def plain(args, timeout=240, extra_env=None):
    return subprocess.run([sys.executable, str(MAIN)] + [str(a) for a in args], env=env(extra_env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(shared_once(tmp_path_factory, "data_cache", lambda d: None))


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, cache):
    """One plain-CLIP epoch on one process: checkpoints/epoch_1.pt in OpenCLIP's layout."""
    def build(logs):
        res = plain(tiny_args(logs, "src", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "1",
                              "--synthetic-train-samples", "64"))
        assert res.returncode == 0, res.stderr

    return shared_once(tmp_path_factory, "openclip_src", build) / "src" / "checkpoints" / "epoch_1.pt"


def assert_same_tree(a, b, path=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.float(), b.float()), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}/{i}")
    else:
        assert a == b, (path, a, b)


def test_epoch_file_has_openclip_layout_and_round_trips_through_fsdp2(one_epoch, tmp_path, cache):
    """--resume FILE.pt on two FSDP2 ranks (optimizer state sharded by set_optimizer_state_dict), nothing left to
    train, then the file written again (gathered): model and optimizer state equal the original, key by key."""
    src = torch.load(one_epoch, weights_only=True)
    assert {"epoch", "name", "state_dict", "optimizer"} <= set(src) and src["epoch"] == 1
    opt = src["optimizer"]
    assert [len(g["params"]) for g in opt["param_groups"]] and len(opt["param_groups"]) == 2
    assert sorted(opt["state"]) == list(range(sum(len(g["params"]) for g in opt["param_groups"])))
    assert src["state_dict"]["logit_scale"].dim() == 0 and opt["state"][0]["exp_avg"].shape == torch.Size([])
    res = torchrun(2, MAIN, tiny_args(tmp_path, "again", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "1",
                                      "--synthetic-train-samples", "64", "--resume", one_epoch))
    assert "resumed from OpenCLIP checkpoint" in res.stdout
    out = torch.load(tmp_path / "again" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert_same_tree(src["state_dict"], out["state_dict"])
    assert_same_tree(src["optimizer"], out["optimizer"])


def test_two_ranks_continue_an_openclip_file(one_epoch, tmp_path, cache):
    res = torchrun(2, MAIN, tiny_args(tmp_path, "more", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "2",
                                      "--synthetic-train-samples", "64", "--resume", one_epoch))
    rows = [json.loads(x) for x in (tmp_path / "more" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps[0] == 5 and steps[-1] == 8  # 64 / (2 x 8) = 4 steps per epoch; epoch 2 only
    assert "epoch 1, step 4" in res.stdout


_OC_MAIN = textwrap.dedent("""
    import json, os, sys, tempfile
    import open_clip
    from sparo_fast.clip import get_model_config
    d = tempfile.mkdtemp()
    json.dump(dict(get_model_config("ViT-Tiny")), open(os.path.join(d, "ViT-Tiny.json"), "w"))
    open_clip.add_model_config(d)  # the tiny plain CLIP under its name, for open_clip_train
    from open_clip_train.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.skipif(not os.path.isdir(os.path.join(OC_PATH, "pandas")),
                    reason=f"open_clip_train needs pandas: pip install --target {OC_PATH} pandas webdataset==0.2.86 "
                           f"(or set OPEN_CLIP_TRAIN_DEPS)")
def test_open_clip_train_continues_this_trainer_and_back(one_epoch, tmp_path, cache):
    script = tmp_path / "oc_main.py"
    script.write_text(_OC_MAIN)
    oc = subprocess.run([sys.executable, str(script), "--model", "ViT-Tiny", "--dataset-type", "synthetic",
                         "--train-num-samples", "16", "--batch-size", "8", "--epochs", "2", "--resume", str(one_epoch),
                         "--logs", str(tmp_path / "oclogs"), "--name", "oc", "--precision", "fp32", "--workers", "0",
                         "--device", "cpu"], env=env({"PYTHONPATH": OC_PATH}), capture_output=True, text=True,
                        timeout=240)
    log = (tmp_path / "oclogs" / "oc" / "out.log").read_text()
    assert oc.returncode == 0 and "resuming checkpoint" in log and "(epoch 1)" in log, oc.stderr[-3000:]
    theirs = tmp_path / "oclogs" / "oc" / "checkpoints" / "epoch_2.pt"
    res = plain(tiny_args(tmp_path, "back", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "3",
                          "--synthetic-train-samples", "64", "--resume", theirs))
    assert res.returncode == 0 and "resumed from OpenCLIP checkpoint" in res.stdout and "epoch 2" in res.stdout


def test_pretrained_safetensors_and_offline_hf_hub(one_epoch, tmp_path):
    from safetensors.torch import save_file

    sd = torch.load(one_epoch, weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    snap = tmp_path / "hf" / "models--org--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (tmp_path / "hf" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    os.link(tmp_path / "w.safetensors", snap / "open_clip_model.safetensors")
    code = textwrap.dedent(f"""
        import torch
        from sparo_fast.clip import create_model
        from sparo_fast_training import pretrained
        want = torch.load({str(one_epoch)!r}, weights_only=True)["state_dict"]
        for spec in ({str(tmp_path / 'w.safetensors')!r}, "hf-hub:org/tiny"):
            torch.manual_seed(1)
            m = create_model("ViT-Tiny")
            path = pretrained.load_into(m, spec, cache_dir={str(tmp_path / 'hf')!r})
            got = m.state_dict()
            assert all(torch.equal(got[k], want[k].reshape(got[k].shape)) for k in want), spec
            print("loaded", spec, path)
        try:
            pretrained.resolve("hf-hub:org/missing", cache_dir={str(tmp_path / 'hf')!r})
        except pretrained.PretrainedError as e:
            print("refused", str(e).splitlines()[0])
    """)
    res = subprocess.run([sys.executable, "-c", code], env=env({"HF_HUB_OFFLINE": "1"}), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded hf-hub:org/tiny" in res.stdout and "open_clip_model.safetensors" in res.stdout
    assert "refused --pretrained hf-hub:org/missing" in res.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(OC_PATH, "webdataset")),
                    reason=f"open_clip_train reads shards only with webdataset 0.2.x: pip install --target {OC_PATH} "
                           f"pandas webdataset==0.2.86 (or set OPEN_CLIP_TRAIN_DEPS)")
def test_both_trainers_report_the_same_evaluation_rows(one_epoch, tmp_path, cache):
    """One tiny plain-CLIP epoch with each trainer on the same shards, from the same weights (--pretrained), at a
    learning rate too small for the two data orders to matter: results.jsonl rows with the same keys and values."""
    from sparo_fast_training import synthetic

    d = synthetic.ensure_synthetic(cache, 64, 64, seed=0, log=lambda *_: None, shard_size=1000)
    common = ["--batch-size", "8", "--epochs", "1", "--lr", "1e-9", "--warmup", "1", "--workers", "1",
              "--pretrained", str(one_epoch), "--train-data", d["train"], "--val-data", d["val"],
              "--train-num-samples", "64", "--val-num-samples", "64", "--dataset-type", "webdataset", "--seed", "0",
              "--precision", "fp32", "--zeroshot-frequency", "0", "--save-frequency", "1", "--model", "ViT-Tiny"]
    script = tmp_path / "oc_main.py"
    script.write_text(_OC_MAIN)
    oc = subprocess.run([sys.executable, str(script), *common, "--logs", str(tmp_path / "oc"), "--name", "r",
                         "--device", "cpu"], env=env({"PYTHONPATH": OC_PATH}), capture_output=True, text=True,
                        timeout=300)
    assert oc.returncode == 0, oc.stderr[-3000:]
    res = plain(["--device", "cpu", "--threads", "1", "--logs-dir", tmp_path / "ours", "--name", "r", *common])
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = [json.loads(x) for x in (tmp_path / "oc" / "r" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    ours = [json.loads(x) for x in (tmp_path / "ours" / "r" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert len(theirs) == len(ours) == 1 and set(theirs[0]) <= set(ours[0]), (theirs, ours)
    for k, v in theirs[0].items():
        assert ours[0][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (k, ours[0][k], v)
