"""The resumable webdataset stream, in-process (no workers): coverage, determinism, resume."""
import os
import shutil

import pytest
import torch

from sparo_fast_training import data, synthetic


class Tok:
    def __call__(self, texts):
        return torch.tensor([[len(t), sum(map(ord, t)) % 9973] for t in texts])


def pre(img):
    import torchvision.transforms.functional as TF

    return TF.to_tensor(img) + torch.rand(1)  # a random augmentation: must be reproducible


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("dc")), 96, 8, shard_size=16, log=lambda *_: None)
    return data.expand_urls(d["train"])


def batches(urls, rank=0, world=1, workers=1, epoch=0, start=0, positions=None, n=6, bs=4, shuffle=8):
    """Simulate the loader's round robin over logical workers in-process."""
    specs = []
    out = []
    for slot in range(workers):
        spec = data.StreamSpec(urls=urls, seed=3, epoch=epoch, rank=rank, world_size=world, num_workers=workers,
                               batch_size=bs, batches_per_rank=n, start_batch=start,
                               positions=list(positions or [0] * workers), skipped=[0] * workers,
                               shuffle_buffer=shuffle)
        specs.append(spec)
    its = []
    for slot in range(workers):
        ds = data.TrainStream(specs[slot], pre, Tok())
        info = type("I", (), {"id": slot, "num_workers": workers})()
        data.get_worker_info = lambda info=info: info  # noqa: B023 -- pretend to be loader worker `slot`
        its.append(list(ds))
    data.get_worker_info = __import__("torch.utils.data", fromlist=["get_worker_info"]).get_worker_info
    for i in range(max(map(len, its))):
        for it in its:
            if i < len(it):
                out.append(it[i])
    return out


def test_ranks_and_workers_cover_distinct_samples(shards):
    seen = []
    for rank in range(2):
        for b in batches(shards, rank=rank, world=2, workers=2, n=12):
            seen += b[1][:, 1].tolist()
    assert len(seen) == 96  # 2 ranks x 12 batches x 4: the whole epoch ...
    assert len(set(seen)) >= 60  # ... and distinct captions (captions repeat a little in the set)


def test_epochs_reshuffle_and_runs_repeat(shards):
    a = batches(shards, epoch=0)
    b = batches(shards, epoch=0)
    c = batches(shards, epoch=1)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))


@pytest.mark.parametrize("start", [1, 3, 4])
def test_resume_from_recorded_positions(shards, start):
    full = batches(shards, workers=2, n=8)
    positions = [0, 0]
    for img, tok, info in full[:start]:
        w, pos = info.tolist()[:2]
        positions[w] = pos
    rest = batches(shards, workers=2, n=8, start=start, positions=positions)
    assert len(rest) == len(full) - start
    for x, y in zip(full[start:], rest):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(data.DataError, match="missing or unreadable"):
        data.check_shards(data.expand_urls(str(tmp_path / "a-{0..2}.tar") + "::" + str(tmp_path / "b.tar")), "x")
    assert len(data.expand_urls("a-{00..09}.tar::b-{0..1}.tar")) == 12


class Counting:
    """A shard file object that counts the bytes handed to the reader."""

    opened, nbytes = [], [0]

    def __init__(self, path):
        self.f = open(path, "rb")
        Counting.opened.append(path)

    def read(self, n=-1):
        b = self.f.read(n)
        Counting.nbytes[0] += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    @classmethod
    def reset(cls):
        cls.opened.clear()
        cls.nbytes[0] = 0


def one_reader(urls, start, positions, n, shuffle, bs=4):
    """The loader of one rank with one worker, in-process: an iterator of batches."""
    spec = data.StreamSpec(urls=urls, seed=5, epoch=1, rank=0, world_size=1, num_workers=1, batch_size=bs,
                           batches_per_rank=n, start_batch=start, positions=list(positions), skipped=[0],
                           shuffle_buffer=shuffle)
    return iter(data.TrainStream(spec, pre, Tok()))


@pytest.mark.parametrize("shuffle", [1, 8])
def test_resume_seeks_instead_of_rereading(shards, monkeypatch, shuffle):
    monkeypatch.setattr(data, "_open_local", Counting)
    n, start = 23, 20  # 80 of 96 samples consumed: five shards of 16 (shuffled), and the sixth entered
    Counting.reset()
    it = one_reader(shards, 0, [0], n, shuffle)
    full = [next(it) for _ in range(start + 1)]
    read_full, opened_full = Counting.nbytes[0], list(Counting.opened)
    full += list(it)
    pos = full[start - 1][2].tolist()[1]
    Counting.reset()
    it = one_reader(shards, start, [pos], n, shuffle)
    first = next(it)
    read_resume, opened_resume = Counting.nbytes[0], set(Counting.opened)
    rest = [first] + list(it)
    assert len(rest) == n - start
    for x, y in zip(full[start:], rest):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
    # the uninterrupted run read 80+ samples to get there; the resumed one reads the samples in the shuffle
    # buffer and the next batch (whole tar records), plus the tar headers (512 bytes per member, 3 members
    # per sample) of each shard it enters
    sample = os.path.getsize(shards[0]) / 16
    bound = (shuffle + 4) * (sample + 10240) + len(opened_resume) * 16 * 3 * 512
    assert read_resume < bound, (read_resume, bound, read_full)
    assert read_resume < read_full / 3, (read_resume, read_full)
    if shuffle == 1:  # no buffer: the three consumed shards are not even opened
        assert not opened_resume & set(opened_full[:3]), (opened_full, opened_resume)


@pytest.mark.parametrize("world,workers,sizes,n,start", [(1, 2, False, 12, 9), (4, 2, True, 6, 5),
                                                         (1, 2, True, 30, 27)])
def test_resume_without_sizes_json_and_with_sliced_shards(shards, tmp_path, world, workers, sizes, n, start):
    """Shards counted from their tar headers (no sizes.json); fewer shards than readers (4 x 2 > 6);
    a resume point in the second pass over a reader's shards (15 batches of 4 from 48 samples)."""
    if not sizes:
        for u in shards:
            shutil.copy(u, tmp_path)
        shards = [str(tmp_path / os.path.basename(u)) for u in shards]
    full = batches(shards, rank=world - 1, world=world, workers=workers, n=n)
    positions = [0] * workers
    for img, tok, info in full[:start]:
        w, pos = info.tolist()[:2]
        positions[w] = pos
    rest = batches(shards, rank=world - 1, world=world, workers=workers, n=n, start=start, positions=positions)
    assert len(rest) == n - start
    for x, y in zip(full[start:], rest):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_shuffle_state_replays_the_shuffle():
    import random

    for bufsize, n_out in [(1, 7), (5, 0), (5, 3), (16, 100)]:
        seed = random.getrandbits(32)
        ref = data._shuffled(iter(range(10**6)), bufsize, random.Random(seed))
        out = [next(ref) for _ in range(n_out)]
        rng = random.Random(seed)
        buf, taken = data.shuffle_state(n_out, bufsize, rng)
        resumed = data._shuffled(iter(range(taken, 10**6)), bufsize, rng, buf)
        assert [next(ref) for _ in range(50)] == [next(resumed) for _ in range(50)]
        assert len(out) == n_out


def test_sample_offsets_match_webdataset_grouping(shards):
    offs = data.sample_offsets(shards[1])
    assert len(offs) == 16
    for k in (0, 7, 15):
        got = next(data._raw_samples(shards[1], offs[k]))
        ref = list(data._raw_samples(shards[1]))[k]
        assert got == ref
