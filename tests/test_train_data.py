"""The resumable webdataset stream, in-process (no workers): coverage, determinism, resume."""
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
        w, pos, _ = info.tolist()
        positions[w] = pos
    rest = batches(shards, workers=2, n=8, start=start, positions=positions)
    assert len(rest) == len(full) - start
    for x, y in zip(full[start:], rest):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_missing_shards_are_reported(tmp_path):
    with pytest.raises(data.DataError, match="missing or unreadable"):
        data.check_shards(data.expand_urls(str(tmp_path / "a-{0..2}.tar") + "::" + str(tmp_path / "b.tar")), "x")
    assert len(data.expand_urls("a-{00..09}.tar::b-{0..1}.tar")) == 12
