"""Nothing lost, nothing hangs, failures at start: run folders of this trainer and of open_clip_train, corrupt
checkpoints, unreadable shards, corrupt-sample limits, rate-limited warnings, bad paths (one line each)."""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from train_utils import MAIN, env, shared_once, tiny_args



def plain(args, timeout=180, extra_env=None):
    return subprocess.run([sys.executable, str(MAIN)] + [str(a) for a in args], env=env(extra_env),
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(res, *needles):
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr,
                                                                                     res.stdout[-2000:])
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(shared_once(tmp_path_factory, "data_cache", lambda d: None))


@pytest.fixture(scope="module")
def shards(cache):
    from sparo_fast_training import synthetic

    return synthetic.ensure_synthetic(cache, 384, 64, shard_size=64, log=lambda *_: None)


def quick(tmp, name, cache, *extra):
    return tiny_args(tmp, name, cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "1", "--max-steps", "2",
                     *extra)


# ------------------------------------------------------------------ nothing lost


def test_second_run_with_the_same_name_is_refused(tmp_path, cache):
    res = plain(quick(tmp_path, "run", cache))
    assert res.returncode == 0, res.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    res = plain(quick(tmp_path, "run", cache))
    one_error_line(res, "experiment already exists", "--name")
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # not one byte written


def test_open_clip_train_run_folder_is_never_written(tmp_path, cache):
    run = tmp_path / "oc"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text("batch_size: 8\n")
    (run / "out.log").write_text("open_clip_train log\n")
    (run / "checkpoints" / "epoch_2.pt").write_bytes(b"their checkpoint")
    for extra in ([], ["--resume", "latest"]):
        res = plain(quick(tmp_path, "oc", cache, *extra))
        one_error_line(res, "open_clip_train run folder", "refusing")
    assert (run / "checkpoints" / "epoch_2.pt").read_bytes() == b"their checkpoint"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "epoch_2.pt", "out.log", "params.txt"]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache):
    args = tiny_args(tmp_path, "fb", cache, "--model", "ViT-Tiny", "--no-eval", "--epochs", "1",
                     "--save-every-n-steps", "2", "--keep-checkpoints", "3")
    res = plain(args + ["--max-steps", "4"])
    assert res.returncode == 0, res.stderr
    ck = tmp_path / "fb" / "checkpoints"
    newest = ck / "step_00000004"
    shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:100])  # cut short (e.g. a full disk under another writer)
    res = plain(args + ["--max-steps", "5", "--resume", "latest"])
    assert res.returncode == 0, res.stderr
    warn = [ln for ln in res.stdout.splitlines() if "is unusable" in ln]
    assert len(warn) == 1 and str(newest) in warn[0] and str(ck / "step_00000002") in warn[0], res.stdout
    assert "truncated" in warn[0]
    assert f"resumed from {ck / 'step_00000002'}: step 2" in res.stdout


# ------------------------------------------------------------------ nothing hangs


def _shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("kind", ["empty", "garbage", "no-image"])
def test_unreadable_shard_stops_at_start(tmp_path, cache, shards, kind):
    bad = tmp_path / "bad-000001.tar"
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "garbage":
        bad.write_bytes(os.urandom(5000))
    else:
        _shard(bad, [("a.txt", b"a caption"), ("a.json", b"{}")])
    good = os.path.join(shards["folder"], "train-000000.tar")
    res = plain(tiny_args(tmp_path, "bad", cache, "--train-data", f"{good}::{bad}", "--train-num-samples", "64"),
                timeout=120)
    one_error_line(res, "--train-data", str(bad), "no readable sample", "1 of 2 shards")
    assert not (tmp_path / "bad").exists()


def test_a_pass_without_any_sample_raises_instead_of_looping(tmp_path):
    from sparo_fast_training import data

    bad = tmp_path / "empty.tar"
    bad.write_bytes(b"")
    spec = data.StreamSpec(urls=[str(bad)], seed=0, epoch=0, rank=0, world_size=1, num_workers=0, batch_size=2,
                           batches_per_rank=1)
    with pytest.raises(data.DataError, match="gave no readable sample"):
        next(iter(data.TrainStream(spec, lambda im: im, lambda t: torch.zeros(1, 4))))


def _corrupt_copy(src, dst, n_bad):
    with tarfile.open(src) as s, tarfile.open(dst, "w") as d:
        keys = sorted({m.name.split(".")[0] for m in s.getmembers()})
        bad = set(keys[:n_bad])
        for m in s.getmembers():
            blob = s.extractfile(m).read()
            if m.name.endswith(".png") and m.name.split(".")[0] in bad:
                blob = b"\x89PNG not an image"
            info = tarfile.TarInfo(m.name)
            info.size = len(blob)
            d.addfile(info, io.BytesIO(blob))


def test_too_many_corrupt_samples_stop_with_one_line(tmp_path, cache, shards):
    bad = tmp_path / "bad-000000.tar"
    _corrupt_copy(os.path.join(shards["folder"], "train-000000.tar"), bad, 20)  # 20 of 64 (31%)
    args = tiny_args(tmp_path, "frac", cache, "--train-data", bad, "--train-num-samples", "40", "--epochs", "1",
                     "--no-eval", "--shuffle-buffer", "0")
    line = one_error_line(plain(args + ["--max-corrupt-fraction", "0.1"]), "corrupt", "--max-corrupt-fraction 0.1")
    assert "11 of the" in line  # stops at the first sample above 10% of 100
    res = plain(tiny_args(tmp_path, "frac2", cache, "--train-data", bad, "--train-num-samples", "40", "--epochs",
                          "1", "--no-eval", "--shuffle-buffer", "0", "--max-corrupt-fraction", "0.5"))
    assert res.returncode == 0, res.stderr
    # 40 samples per epoch need 60 reads (20 corrupt), honestly counted; warnings rate-limited
    assert "skipped 20 corrupt samples" in res.stdout
    assert json.loads((tmp_path / "frac2" / "summary.json").read_text())["skipped_samples"] == 20
    assert 3 <= res.stdout.count("skipping corrupt sample") <= 4, res.stdout.count("skipping corrupt sample")
    assert "corrupt 20 samples" in res.stdout  # in the progress line


def test_warnings_are_rate_limited(caplog):
    from sparo_fast_training.data import RateLimitedWarnings

    w = RateLimitedWarnings()
    with caplog.at_level(logging.WARNING, logger="sparo_fast_training"):
        for i in range(1000):
            w.warn("x", f"event {i}")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == \
        ["event 0", "event 1", "event 2", "event 9", "event 99", "event 999"]


def test_csv_with_dataset_type_auto_is_one_line(tmp_path, cache):
    (tmp_path / "train.csv").write_text("filepath\ttitle\n")
    res = plain(tiny_args(tmp_path, "csv", cache, "--train-data", tmp_path / "train.csv"), timeout=60)
    one_error_line(res, "--train-data", "csv", "webdataset")


# ------------------------------------------------------------------ fail at start


def test_bad_paths_fail_at_start_with_one_line(tmp_path, cache):
    one_error_line(plain(quick(tmp_path, "inet", cache, "--imagenet-val", tmp_path / "nope")),
                   "--imagenet-val", "not a folder")
    (tmp_path / "inet2").mkdir()
    (tmp_path / "inet2" / "n0001").mkdir()
    one_error_line(plain(quick(tmp_path, "inet", cache, "--imagenet-val", tmp_path / "inet2")),
                   "1 class folders, expected 1000")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_error_line(plain(tiny_args(blocker / "logs", "x", cache)), "--logs", "not a folder")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    one_error_line(plain(quick(tmp_path, "pre", cache, "--pretrained", junk)), "--pretrained")
    assert not [p for p in tmp_path.iterdir() if p.name in ("inet", "pre")]


def test_unwritable_checkpoint_folder_is_reported():
    from sparo_fast_training import rundir

    why = rundir.writable_problem("/proc/version/checkpoints", "checkpoint folder")
    assert why.startswith("checkpoint folder /proc/version/checkpoints: not writable")
    assert rundir.writable_problem(os.path.dirname(__file__) + "/__pycache__", "x") is None


def _slow(image):
    import time

    time.sleep(30)
    return image


def test_stalled_loader_stops_with_one_line(shards):
    """No batch within --data-timeout: the loader raises, the trainer turns it into one line."""
    from sparo_fast_training import data
    from sparo_fast_training.errors import Fatal
    from sparo_fast_training.params import parse_args
    from sparo_fast_training.trainer import Trainer

    spec = data.StreamSpec(urls=[os.path.join(shards["folder"], "train-000000.tar")], seed=0, epoch=0, rank=0,
                           world_size=1, num_workers=1, batch_size=2, batches_per_rank=1)
    t = Trainer(parse_args(["--data-timeout", "2"]))
    t.loader = iter(data.train_loader(spec, _slow, lambda texts: torch.zeros(1, 4, dtype=torch.long), timeout=2))
    with pytest.raises(Fatal, match="no training batch for --data-timeout 2 s"):
        t.next_batch()
    t.loader = None
