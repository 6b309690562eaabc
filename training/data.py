"""Webdataset input pipeline, exactly resumable.

Every rank and data-loader worker reads a deterministic stream: the shard order is a function of
(seed, epoch, pass), shards are split across the ``world * workers`` readers (or, with too few
shards, samples are split by index), and the sample shuffle buffer is seeded by
(seed, epoch, rank, worker). Each yielded batch carries the reader's position in that stream (raw
samples consumed, corrupt ones included) so the trainer can record, in a checkpoint, where every
rank and worker stands; on resume each reader regenerates its stream and skips what was consumed.
Random augmentations are seeded per sample from (seed, epoch, rank, worker, position), so a resumed
run sees the very same tensors. A sample that cannot be decoded is skipped and counted.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import braceexpand
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger("sparo_fast_training")

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
TEXT_KEYS = ("txt", "text", "caption")


class DataError(RuntimeError):
    """A data problem that stops the run at start (reported as one line)."""


def expand_urls(spec: str) -> List[str]:
    """Brace-expand each '::'-separated source and concatenate the shard lists."""
    urls: List[str] = []
    for source in spec.split("::"):
        source = source.strip()
        if source:
            urls.extend(braceexpand.braceexpand(source))
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards(urls: Sequence[str], what: str) -> None:
    """Local shards must exist and be readable; remote ones are trusted (their reader warns)."""
    if not urls:
        raise DataError(f"{what}: the shard list is empty")
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if _is_local(url) and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            n_missing = sum(1 for u in urls if _is_local(u) and not os.path.isfile(u))
            raise DataError(f"{what}: shard {url!r} is missing or unreadable "
                            f"({n_missing} of {len(urls)} local shards missing)")


def count_samples(urls: Sequence[str]) -> Optional[int]:
    """Total samples from ``sizes.json`` beside the shards (OpenCLIP's convention), if every shard is listed."""
    total = 0
    cache: Dict[str, dict] = {}
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in cache:
            path = os.path.join(folder, "sizes.json")
            if not os.path.isfile(path):
                return None
            with open(path) as f:
                cache[folder] = json.load(f)
        n = cache[folder].get(os.path.basename(url))
        if n is None:
            return None
        total += int(n)
    return total


def _raw_samples(url: str) -> Iterator[dict]:
    """Samples (dicts of raw bytes by extension) of one shard; a broken shard is warned about and cut short."""
    from webdataset.tariterators import tarfile_samples

    def handler(exn):
        log.warning("skipping unreadable shard data: %s", repr(exn)[:300])
        return True

    yield from tarfile_samples([{"url": url}], handler=handler)


def _seed(*parts) -> int:
    return random.Random("/".join(str(p) for p in parts)).getrandbits(63)


def _shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Buffer shuffle (as webdataset's), driven by an explicit RNG."""
    if bufsize <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = item
    while buf:
        yield buf.pop(rng.randrange(len(buf)))


def _decode(sample: dict, preprocess: Callable, tokenizer: Callable):
    from PIL import Image

    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    txt_key = next((k for k in TEXT_KEYS if k in sample), None)
    if img_key is None or txt_key is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image or no caption")
    with Image.open(io.BytesIO(sample[img_key])) as im:
        im.load()
        image = preprocess(im.convert("RGB"))
    text = sample[txt_key].decode("utf-8")
    tokens = tokenizer([text])[0]
    return image, tokens


@dataclass
class StreamSpec:
    """What a training data stream needs; picklable, sent to the loader workers."""

    urls: List[str]
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    batches_per_rank: int          # batches this rank takes in the epoch
    start_batch: int = 0           # batches already consumed (resume)
    positions: List[int] = field(default_factory=list)   # raw samples consumed per logical worker
    skipped: List[int] = field(default_factory=list)     # corrupt samples skipped per logical worker
    shuffle_buffer: int = 1000


class TrainStream(IterableDataset):
    """Batches ``(images, tokens, info)`` where ``info`` = (worker, position, skipped) of the producing reader."""

    def __init__(self, spec: StreamSpec, preprocess: Callable, tokenizer: Callable):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    def _reader_stream(self, worker: int) -> Iterator:
        """Endless raw sample stream of logical reader (rank, worker), in passes over the data."""
        s = self.spec
        nw = max(1, s.num_workers)
        n_readers = s.world_size * nw
        reader = s.rank * nw + worker
        by_shard = len(s.urls) >= n_readers
        p = 0
        while True:
            order = list(s.urls)
            random.Random(_seed("shards", s.seed, s.epoch, p)).shuffle(order)
            if by_shard:
                mine = order[reader::n_readers]
                raw = (x for url in mine for x in _raw_samples(url))
            else:  # fewer shards than readers: every reader reads everything and keeps its slice
                everything = (y for url in order for y in _raw_samples(url))
                raw = (x for i, x in enumerate(everything) if i % n_readers == reader)
            yield from raw
            p += 1

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        slot = info.id if info is not None else 0
        nw = max(1, s.num_workers)
        # After a resume the loader starts its round robin at slot 0, but the next batch belongs to
        # logical worker start_batch % nw: rotate so the batch order is exactly the original one.
        worker = (slot + s.start_batch) % nw
        my_batches = len(range(worker, s.batches_per_rank, nw)) - len(range(worker, s.start_batch, nw))
        pos0 = s.positions[worker] if s.positions else 0
        skipped = s.skipped[worker] if s.skipped else 0
        rng = random.Random(_seed("samples", s.seed, s.epoch, s.rank, worker))
        stream = _shuffled(self._reader_stream(worker), s.shuffle_buffer, rng)
        in_worker = info is not None
        for _ in range(pos0):
            next(stream)
        pos = pos0
        for _ in range(my_batches):
            images, tokens = [], []
            while len(images) < s.batch_size:
                sample = next(stream)
                pos += 1
                seed = _seed("aug", s.seed, s.epoch, s.rank, worker, pos)
                try:
                    if in_worker:
                        torch.manual_seed(seed)
                        random.seed(seed)
                        image, tok = _decode(sample, self.preprocess, self.tokenizer)
                    else:
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            image, tok = _decode(sample, self.preprocess, self.tokenizer)
                except Exception as exn:  # a corrupt sample: skip it, count it
                    skipped += 1
                    log.warning("rank %d worker %d: skipping corrupt sample %r of %s: %s", s.rank, worker,
                                sample.get("__key__"), sample.get("__url__"), repr(exn)[:200])
                    continue
                images.append(image)
                tokens.append(tok)
            yield torch.stack(images), torch.stack(tokens), torch.tensor([worker, pos, skipped])


def train_loader(spec: StreamSpec, preprocess, tokenizer, pin_memory: bool = False) -> DataLoader:
    ds = TrainStream(spec, preprocess, tokenizer)
    kw = {}
    if spec.num_workers > 0:
        kw = dict(persistent_workers=False, prefetch_factor=4)
    return DataLoader(ds, batch_size=None, num_workers=spec.num_workers, pin_memory=pin_memory, **kw)


# ----------------------------------------------------------------------------------------- eval


def load_eval_samples(urls: Sequence[str], preprocess, tokenizer, rank: int, world_size: int,
                      limit: Optional[int] = None):
    """This rank's slice (index % world == rank) of an evaluation set, decoded: a list of dicts."""
    out = []
    i = -1
    for url in urls:
        for sample in _raw_samples(url):
            i += 1
            if limit is not None and i >= limit:
                return out
            if i % world_size != rank:
                continue
            try:
                image, tok = _decode(sample, preprocess, tokenizer)
                meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
                caption = next(sample[k] for k in TEXT_KEYS if k in sample).decode("utf-8")
            except Exception as exn:
                log.warning("eval: skipping corrupt sample %r: %s", sample.get("__key__"), repr(exn)[:200])
                continue
            out.append({"index": i, "image": image, "tokens": tok, "caption": caption, "meta": meta})
    return out

