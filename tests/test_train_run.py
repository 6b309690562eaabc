"""End-to-end trainer runs under torchrun (CPU, gloo): a 2-rank FSDP2 run, exact resume after SIGKILL and
after preemption (SIGTERM), a corrupt sample, a missing shard list, --max-params."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from train_utils import MAIN, REPO, TORCHRUN, env, shared_once, tiny_args, torchrun

HANG = REPO / "tests" / "train_hang.py"

RESUME_FLAGS = ["--epochs", "2", "--synthetic-shard-size", "64", "--workers", "2", "--save-every-n-steps", "7",
                "--warmup", "5", "--lr", "2e-3", "--local-loss", "--gather-with-grad", "--save-frequency", "1"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(shared_once(tmp_path_factory, "data_cache", lambda d: None))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """The reference 2-rank run, made once per pytest run (shared by the xdist workers)."""
    def build(logs):
        res = torchrun(2, MAIN, tiny_args(logs, "full", cache, *RESUME_FLAGS))
        (logs / "stdout.txt").write_text(res.stdout)

    logs = shared_once(tmp_path_factory, "full_run", build)
    return logs / "full", (logs / "stdout.txt").read_text()


def test_two_rank_fsdp_run(uninterrupted):
    run, stdout = uninterrupted
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    losses = [r["loss"] for r in train]
    assert all(map(lambda x: x == x and abs(x) < 1e9, losses))
    assert len(train) == 48 and train[-1]["step"] == 48  # 384 samples / (2 ranks x 8) x 2 epochs
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step_00000048" in ckpts and "epoch_2.pt" in ckpts, ckpts
    assert not [c for c in ckpts if c.endswith(".tmp")]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("zeroshot_color_top1", "zeroshot_shape_top1", "image_to_text_R@1", "text_to_image_R@5",
                "swap_accuracy"):
        assert 0.0 <= summary[key] <= 1.0
    assert "samples/s" in stdout and " eta 0:" in stdout and " elapsed 0:" in stdout
    assert "MFU" not in stdout  # no measured CPU peak: left out


def assert_continues_exactly(full_run, run, after_step):
    """The resumed run's steps after ``after_step`` and its final weights equal the uninterrupted run's."""
    full = [r for r in read_jsonl(full_run / "metrics.jsonl") if r["kind"] == "train"]
    resumed = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    by_step = {r["step"]: r for r in resumed}
    assert max(by_step) == 48
    for r in full:
        if r["step"] > after_step:
            assert by_step[r["step"]]["lr"] == r["lr"]
            got = by_step[r["step"]]["loss"]
            assert abs(got - r["loss"]) < 1e-5, (r["step"], got, r["loss"])
    a = torch.load(full_run / "checkpoints" / "epoch_2.pt", weights_only=False)
    b = torch.load(run / "checkpoints" / "epoch_2.pt", weights_only=False)
    assert a["step"] == b["step"] == 48
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=1e-6, msg=k)


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d))
    return out


def _preempt(args, run, at_step):
    """Start the run, SIGTERM both ranks (as a scheduler does) once step ``at_step`` is logged; returns
    the step the ranks agreed to stop after and the console output (which holds each rank's event line)."""
    cmd = TORCHRUN + ["--nproc_per_node=2", str(MAIN)] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while not (metrics.is_file() and f'"step": {at_step},' in metrics.read_text()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"the run never reached step {at_step}"
            time.sleep(0.2)
        ranks = [p for p in _children(proc.pid) if "main.py" in open(f"/proc/{p}/cmdline").read()]
        assert len(ranks) == 2
        for p in ranks:
            os.kill(p, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "exitcode  : 3" in out and "preempted: stopped at step" in out, out[-3000:]
    return int(out.split("preempted: stopped at step ")[1].split()[0]), out


def _kill_after_checkpoint(args, run, step):
    """Resume, park right after the checkpoint of ``step`` (tests/train_hang.py), then SIGKILL torchrun,
    both ranks and their loader workers."""
    cmd = TORCHRUN + ["--nproc_per_node=2", str(HANG)] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, env=env({"HANG_AT_STEP": str(step)}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pid_files = [run / f"hang_pids_rank{r}.txt" for r in (0, 1)]
    deadline = time.time() + 300
    pids = []
    try:
        while not all(p.is_file() and p.read_text().strip() for p in pid_files):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"the run never reached its step-{step} checkpoint"
            time.sleep(0.5)
        time.sleep(0.5)
        pids = [int(x) for p in pid_files for x in p.read_text().split()]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def test_preemption_then_sigkill_resume_exactly(uninterrupted, tmp_path, cache):
    """1. SIGTERM to both ranks mid-epoch: each finishes its step, they agree on the step, write a complete
    checkpoint and exit with status 3. 2. --resume latest, SIGKILL right after the periodic step-35
    checkpoint (epoch 1, step 11 of 24: an odd number of batches into the epoch, so the loader workers'
    round robin must be rotated). 3. --resume latest to the end. Every step after the preemption and the
    final weights equal the uninterrupted run's."""
    full_run, _ = uninterrupted
    run = tmp_path / "pre"
    args = tiny_args(tmp_path, "pre", cache, *RESUME_FLAGS)
    stopped, out = _preempt(args, run, 17)
    # the event each rank reports: the steps it had finished when its handler ran; the ranks stop after the
    # step in progress at the first of them (or right there, between a step and its vote)
    handled = [int(x.split()[0]) for x in out.split("preempt signal handled after step ")[1:]
               if x.split()[0].isdigit()]
    assert handled and min(handled) >= 17, out[-3000:]
    assert stopped in (min(handled), min(handled) + 1), (stopped, handled)
    assert (run / "checkpoints" / f"step_{stopped:08d}").is_dir()
    _kill_after_checkpoint(args + ["--resume", "latest"], run, 35)
    assert (run / "checkpoints" / "step_00000035").is_dir()
    res = torchrun(2, MAIN, args + ["--resume", "latest"])
    assert "resumed from" in res.stdout and "step_00000035" in res.stdout
    assert_continues_exactly(full_run, run, stopped)


def _corrupt_shard(src_tar, dst_tar, bad_index):
    with tarfile.open(src_tar) as src, tarfile.open(dst_tar, "w") as dst:
        members = src.getmembers()
        keys = sorted({m.name.split(".")[0] for m in members})
        bad = keys[bad_index]
        for m in members:
            data = src.extractfile(m).read()
            if m.name == f"{bad}.png":
                data = b"\x89PNG this is not an image" + data[40:60]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_corrupt_sample_is_skipped_and_reported(tmp_path, cache):
    from sparo_fast_training import synthetic

    d = synthetic.ensure_synthetic(cache, 384, 64, shard_size=64, log=lambda *_: None)
    shard = os.path.join(d["folder"], "train-000000.tar")
    bad = tmp_path / "bad-000000.tar"
    _corrupt_shard(shard, bad, 3)
    args = tiny_args(tmp_path, "corrupt", cache, "--train-data", bad, "--train-num-samples", "48",
                     "--shuffle-buffer", "0", "--epochs", "1", "--no-eval", "--save-frequency", "0")
    res = torchrun(1, MAIN, args)
    assert "skipped 1 corrupt sample" in res.stdout
    summary = json.loads((tmp_path / "corrupt" / "summary.json").read_text())
    assert summary["skipped_samples"] == 1 and summary["steps"] == 6


def _plain(args, tmp_path):
    return subprocess.run([sys.executable, str(MAIN)] + [str(a) for a in args], env=env(), capture_output=True,
                          text=True, timeout=120)


def test_missing_shards_stop_with_one_line(tmp_path, cache):
    res = _plain(tiny_args(tmp_path, "missing", cache, "--train-data", tmp_path / "nope-{000..003}.tar",
                           "--train-num-samples", "100"), tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --train-data: shard") and "missing" in lines[0], res.stderr
    assert not (tmp_path / "missing").exists()  # no empty run folder left behind


def test_max_params_refuses_large_model(tmp_path, cache):
    res = _plain(tiny_args(tmp_path, "big", cache, "--max-params", "1000000"), tmp_path)
    assert res.returncode == 2 and "above --max-params" in res.stderr


def test_resume_on_another_world_size(uninterrupted, tmp_path):
    """Mid-epoch on a different layout: one clear line. At an epoch boundary: DCP reshards and it trains on."""
    import shutil

    full_run, _ = uninterrupted
    shutil.copytree(full_run, tmp_path / "copy")
    cache = json.loads((full_run / "params.json").read_text())["data_cache_dir"]
    ck = tmp_path / "copy" / "checkpoints"
    mid = ck / "step_00000042"  # epoch 1, step 18 of 24
    res = _plain(tiny_args(tmp_path, "copy", cache, *RESUME_FLAGS, "--resume", mid), tmp_path)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: cannot resume") \
        and len(res.stderr.strip().splitlines()) == 1, res.stderr
    args = tiny_args(tmp_path, "copy", cache, *RESUME_FLAGS[:-2], "--epochs", "3", "--save-frequency", "0",
                     "--no-eval", "--no-export", "--max-steps", "52", "--resume", ck / "step_00000048")
    res = torchrun(1, MAIN, args)
    train = [r for r in read_jsonl(tmp_path / "copy" / "metrics.jsonl") if r["kind"] == "train"]
    # one rank now: 384 / 8 = 48 steps per epoch (144 in all); the run continues from step 48 (4 steps here)
    assert "48 steps/epoch, 144 steps" in res.stdout and "resumed from" in res.stdout
    assert [r["step"] for r in train if r["step"] > 48] == [49, 50, 51, 52]
    assert all(r["loss"] == r["loss"] and r["epoch"] == 2 for r in train if r["step"] > 48)
