"""Webdataset input pipeline, exactly resumable.

Every rank and data-loader worker reads a deterministic stream: the shard order is a function of
(seed, epoch, pass), shards are split across the ``world * workers`` readers (or, with too few
shards, samples are split by index), and the sample shuffle buffer is seeded by
(seed, epoch, rank, worker). Each yielded batch carries the reader's position in that stream (raw
samples consumed, corrupt ones included) so the trainer can record, in a checkpoint, where every
rank and worker stands. On resume a reader does not re-read what it consumed: it replays the shuffle
buffer on sample indices (see ``shuffle_state``), reads the buffered samples alone by byte range, skips
the consumed shards unopened (counts from ``sizes.json`` or the tar headers) and seeks into the shard of
the resume point (remote or compressed shards are re-read instead). Random augmentations are seeded per sample from (seed, epoch, rank, worker, position), so a resumed
run sees the very same tensors. A sample that cannot be decoded is skipped and counted.
"""
from __future__ import annotations

import bisect
import io
import json
import logging
import os
import random
import re
import tarfile
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


def _reraise(exn):
    raise exn


def first_sample(url: str) -> dict:
    """The first sample of a local shard, read strictly (any tar error raises)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with _open_local(_local_path(url)) as f:
        files = tar_file_expander([{"url": url, "stream": f}], handler=_reraise)
        for sample in group_by_keys(files, handler=_reraise):
            return sample
    raise ValueError("no sample in it (empty or not a tar file)")


def check_shards(urls: Sequence[str], what: str) -> None:
    """Every local shard must exist, open as a tar and hold a first sample with an image and a caption (so a
    0-byte, garbage or foreign shard stops the run at start, in time bounded by one sample per shard).
    Remote shards are trusted (their reader warns and counts)."""
    if not urls:
        raise DataError(f"{what}: the shard list is empty")
    for url in urls:
        path = _local_path(url)
        if _is_local(url) and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            n_missing = sum(1 for u in urls if _is_local(u) and not os.path.isfile(_local_path(u)))
            raise DataError(f"{what}: shard {url!r} is missing or unreadable "
                            f"({n_missing} of {len(urls)} local shards missing)")
    bad = []
    for url in urls:
        if not _is_local(url):
            continue
        try:
            sample = first_sample(url)
            if not any(k in sample for k in IMAGE_KEYS) or not any(k in sample for k in TEXT_KEYS):
                raise ValueError(f"its first sample {sample.get('__key__')!r} has no image "
                                 f"({'/'.join(IMAGE_KEYS)}) or no caption ({'/'.join(TEXT_KEYS)})")
        except Exception as exn:
            bad.append((url, f"{type(exn).__name__}: {str(exn).splitlines()[0][:160] if str(exn) else ''}"))
    if bad:
        url, why = bad[0]
        raise DataError(f"{what}: shard {url!r} has no readable sample ({why}); "
                        f"{len(bad)} of {len(urls)} shards are unreadable")


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


def _seed(*parts) -> int:
    return random.Random("/".join(str(p) for p in parts)).getrandbits(63)


def _shuffled(items: Iterator, bufsize: int, rng: random.Random, buf: Optional[list] = None) -> Iterator:
    """Buffer shuffle (as webdataset's), driven by an explicit RNG; ``buf``: a buffer restored on resume."""
    if bufsize <= 1:
        yield from items
        return
    buf = list(buf or [])
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(len(buf))
        yield buf[i]
        buf[i] = item
    while buf:
        yield buf.pop(rng.randrange(len(buf)))


def shuffle_state(n_out: int, bufsize: int, rng: random.Random):
    """Replay ``_shuffled`` over an endless stream on indices alone: after ``n_out`` outputs, the raw indices
    held in the buffer (slot order) and the number of raw items taken. Advances ``rng`` exactly as the
    real shuffle did (its draws depend only on the buffer length, never on the items)."""
    if bufsize <= 1 or n_out == 0:
        return [], n_out
    buf = list(range(bufsize))
    draw = rng.randrange
    for t in range(bufsize, bufsize + n_out):
        buf[draw(bufsize)] = t
    return buf, bufsize + n_out


class RateLimitedWarnings:
    """Warn about the first few events of each kind, then only at 10, 100, 1000, ... events (each line says how
    many so far), so that a broken data set cannot fill the log; the counts go to the progress line and the
    summary instead."""

    FIRST = 3

    def __init__(self):
        self.counts: Dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.FIRST:
            log.warning("%s", message)
        elif n >= 10 and str(n).strip("0") == "1":  # 10, 100, 1000, ...
            log.warning("%s (%d so far; lines for the others are left out)", message, n)


WARNINGS = RateLimitedWarnings()


def _warn_handler(exn) -> bool:
    WARNINGS.warn("shard", f"skipping unreadable shard data: {repr(exn)[:300]}")
    return True


def _counting_handler(counter: List[int]):
    """A webdataset handler that warns (rate-limited), counts the error in ``counter[0]`` and goes on."""
    def handler(exn) -> bool:
        counter[0] += 1
        return _warn_handler(exn)
    return handler


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _seekable(url: str) -> bool:
    """A local uncompressed tar: its samples can be reached by byte offset."""
    return _is_local(url) and not url.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))


def _open_local(path: str):
    """Open a local shard (a seam: tests and bench/trainer/resume_read_volume.py wrap it to count the bytes read)."""
    return open(path, "rb")


def _samples_from(url: str, stream, handler=_warn_handler) -> Iterator[dict]:
    """webdataset's own tar expansion and key grouping over an open stream."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
    return group_by_keys(files, handler=handler)


def _raw_samples(url: str, offset: int = 0, handler=_warn_handler) -> Iterator[dict]:
    """Samples (dicts of raw bytes by extension) of one shard, from the sample whose first member starts at
    byte ``offset``; a broken shard is warned about (``handler``) and cut short."""
    if not _seekable(url):
        from webdataset.tariterators import tarfile_samples

        if offset:
            raise ValueError(f"{url}: cannot seek in a remote or compressed shard")
        yield from tarfile_samples([{"url": url}], handler=handler)
        return
    try:
        f = _open_local(_local_path(url))
    except OSError as exn:
        handler(exn)
        return
    with f:
        f.seek(offset)
        yield from _samples_from(url, f, handler)


_META = re.compile(r"__[^/]*__($|/)")


def sample_offsets(url: str, upto: Optional[int] = None) -> List[int]:
    """Byte offset of the first member of each sample (of the first ``upto + 1``), read from the tar headers
    alone (the seekable tar reader seeks past the data), grouped by key as webdataset's ``group_by_keys``."""
    from webdataset.tariterators import base_plus_ext

    offsets: List[int] = []
    key = None
    with _open_local(_local_path(url)) as f, tarfile.open(fileobj=f, mode="r:") as tf:
        while True:
            ti = tf.next()
            if ti is None:
                break
            tf.members = []  # headers only; do not keep them all
            if not ti.isreg() or _META.match(ti.name) or \
                    ("/" not in ti.name and ti.name.startswith("__") and ti.name.endswith("__")):
                continue
            prefix, _ = base_plus_ext(ti.name)
            if prefix is None or prefix == key:
                continue
            key = prefix
            if upto is not None and len(offsets) > upto:
                break
            offsets.append(ti.offset)
    return offsets


def _sizes_json(folder: str, cache: Dict[str, Optional[dict]]) -> Optional[dict]:
    if folder not in cache:
        path = os.path.join(folder, "sizes.json")
        cache[folder] = None
        if os.path.isfile(path):
            with open(path) as f:
                cache[folder] = json.load(f)
    return cache[folder]


class ShardIndex:
    """Samples per shard, from ``sizes.json`` (OpenCLIP's convention: the shard is not opened) or else counted
    from its tar headers; and the byte offsets of its samples (from the headers, cached)."""

    def __init__(self):
        self._sizes: Dict[str, Optional[dict]] = {}
        self._n: Dict[str, int] = {}
        self._offsets: Dict[str, List[int]] = {}
        self._complete: set = set()

    def count(self, url: str) -> int:
        if url not in self._n:
            sizes = _sizes_json(os.path.dirname(_local_path(url)), self._sizes)
            n = sizes.get(os.path.basename(url)) if sizes else None
            self._n[url] = int(n) if n is not None else len(self.offsets(url))
        return self._n[url]

    def offsets(self, url: str, upto: Optional[int] = None) -> List[int]:
        """Offsets of samples ``0..upto`` (fewer at the end of the shard; all when ``upto`` is None)."""
        have = self._offsets.get(url, [])
        if url not in self._complete and (upto is None or len(have) <= upto):
            have = sample_offsets(url, upto)
            self._offsets[url] = have
            if upto is None or len(have) <= upto:
                self._complete.add(url)
        return have


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
    shard_errors: List[int] = field(default_factory=list)  # shard read errors (each cuts a shard short)
    max_corrupt_fraction: float = 1.0  # stop when more than this fraction of the samples read are corrupt


# the fraction is judged over at least this many samples read, so that one early corrupt sample cannot stop
# a run whose limit is small
CORRUPT_WINDOW = 100


class TrainStream(IterableDataset):
    """Batches ``(images, tokens, info)`` where ``info`` = (worker, position, skipped) of the producing reader."""

    def __init__(self, spec: StreamSpec, preprocess: Callable, tokenizer: Callable):
        super().__init__()
        self.spec = spec
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self._plans: Dict[tuple, tuple] = {}   # (worker, pass) -> shards, stride, phase
        self._starts: Dict[tuple, List[int]] = {}  # (worker, pass) -> first global position of each shard
        self._errors = [0]  # shard read errors of this reader (set per worker in __iter__)

    def _plan(self, worker: int, p: int):
        """Pass ``p`` of reader (rank, worker): its shards, and which global positions of their concatenation
        it keeps (``phase``, ``phase + stride``, ...)."""
        if (worker, p) not in self._plans:
            s = self.spec
            nw = max(1, s.num_workers)
            n_readers = s.world_size * nw
            reader = s.rank * nw + worker
            order = list(s.urls)
            random.Random(_seed("shards", s.seed, s.epoch, p)).shuffle(order)
            if len(s.urls) >= n_readers:
                self._plans[worker, p] = (order[reader::n_readers], 1, 0)
            else:  # fewer shards than readers: each reads everything and keeps its slice
                self._plans[worker, p] = (order, n_readers, reader)
        return self._plans[worker, p]

    def _seek(self, worker: int, raw: int, index: "ShardIndex"):
        """Where raw sample ``raw`` of the reader's stream lies: (pass, (shard, sample in shard, global position))."""
        p = 0
        while True:
            shards, stride, phase = self._plan(worker, p)
            g = phase + raw * stride
            cum = self._starts.setdefault((worker, p), [0])  # cum[i]: samples of the pass before shard i
            while len(cum) <= len(shards) and cum[-1] <= g:  # counted lazily, as far as needed
                cum.append(cum[-1] + index.count(shards[len(cum) - 1]))
            if cum[-1] > g:
                i = bisect.bisect_right(cum, g) - 1
                return p, (i, g - cum[i], g)
            taken = len(range(phase, cum[-1], stride))
            if taken == 0:
                raise DataError(f"rank {self.spec.rank} worker {worker}: no training samples in its shards")
            raw -= taken
            p += 1

    def _passes(self, worker: int, start: int = 0, index: Optional["ShardIndex"] = None) -> Iterator:
        """Endless raw sample stream of logical reader (rank, worker), in passes over the data, from raw
        sample ``start`` (consumed shards are not opened; the shard of ``start`` is entered by seeking)."""
        p, first = (0, (0, 0, 0)) if start == 0 else self._seek(worker, start, index)
        handler = _counting_handler(self._errors)
        while True:
            shards, stride, phase = self._plan(worker, p)
            s0, k0, g = first
            read = 0
            for i in range(s0, len(shards)):
                offset = 0
                if i == s0 and k0:
                    offsets = index.offsets(shards[i], k0)
                    if len(offsets) <= k0:
                        raise DataError(f"{shards[i]}: fewer samples than sizes.json lists; cannot resume in it")
                    offset = offsets[k0]
                for sample in _raw_samples(shards[i], offset, handler):
                    read += 1
                    if g % stride == phase:
                        yield sample
                    g += 1
            if read == 0 and s0 == 0 and k0 == 0:  # endless passes over nothing would never end
                raise DataError(f"rank {self.spec.rank} worker {worker}: a whole pass over its {len(shards)} "
                                f"shard(s) gave no readable sample ({self._errors[0]} shard read errors)")
            first = (0, 0, 0)
            p += 1

    def _fetch(self, worker: int, raws: List[int], index: "ShardIndex") -> list:
        """The raw samples ``raws`` of the reader's stream, each read alone by its byte range."""
        where = {}
        for r in set(raws):
            p, (i, k, _) = self._seek(worker, r, index)
            where[r] = (self._plan(worker, p)[0][i], k)
        got: Dict[tuple, dict] = {}
        for url in sorted({u for u, _ in where.values()}):
            ks = sorted({k for u, k in where.values() if u == url})
            offsets = index.offsets(url, ks[-1] + 1)
            with _open_local(_local_path(url)) as f:
                for k in ks:
                    f.seek(offsets[k])
                    blob = f.read(offsets[k + 1] - offsets[k]) if k + 1 < len(offsets) else f.read()
                    got[url, k] = next(iter(_samples_from(url, io.BytesIO(blob))))
        return [got[where[r]] for r in raws]

    def _stream(self, worker: int, pos0: int, rng: random.Random) -> Iterator:
        """The shuffled sample stream of the reader, after ``pos0`` samples already taken from it."""
        s = self.spec
        if pos0 == 0:
            return _shuffled(self._passes(worker), s.shuffle_buffer, rng)
        if not all(_seekable(u) for u in s.urls):  # remote or compressed shards: re-read and discard
            stream = _shuffled(self._passes(worker), s.shuffle_buffer, rng)
            for _ in range(pos0):
                next(stream)
            return stream
        index = ShardIndex()
        slots, taken = shuffle_state(pos0, s.shuffle_buffer, rng)
        buf = self._fetch(worker, slots, index)
        return _shuffled(self._passes(worker, taken, index), s.shuffle_buffer, rng, buf)

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
        self._errors = [s.shard_errors[worker] if s.shard_errors else 0]
        rng = random.Random(_seed("samples", s.seed, s.epoch, s.rank, worker))
        stream = self._stream(worker, pos0, rng)
        in_worker = info is not None
        pos = pos0
        for _ in range(my_batches):
            images, tokens = [], []
            while len(images) < s.batch_size:
                sample = next(stream)
                pos += 1
                seed = _seed("aug", s.seed, s.epoch, s.rank, worker, pos)
                try:
                    # the CPU generator alone (the augmentations run on the CPU): torch.manual_seed also
                    # queues a seed for each lazily initialised accelerator, formatting a stack trace every
                    # time, ~0.3 ms a call: most of the loader's own cost on the built-in data set
                    if in_worker:
                        torch.default_generator.manual_seed(seed)
                        random.seed(seed)
                        image, tok = _decode(sample, self.preprocess, self.tokenizer)
                    else:
                        with torch.random.fork_rng(devices=[]):
                            torch.default_generator.manual_seed(seed)
                            image, tok = _decode(sample, self.preprocess, self.tokenizer)
                except Exception as exn:  # a corrupt sample: skip it, count it
                    skipped += 1
                    WARNINGS.warn("sample", f"rank {s.rank} worker {worker}: skipping corrupt sample "
                                            f"{sample.get('__key__')!r} of {sample.get('__url__')}: {repr(exn)[:200]}")
                    if skipped > s.max_corrupt_fraction * max(pos, CORRUPT_WINDOW):
                        raise DataError(f"rank {s.rank} worker {worker}: {skipped} of the {pos} samples read are "
                                        f"corrupt, above --max-corrupt-fraction {s.max_corrupt_fraction:g}")
                    continue
                images.append(image)
                tokens.append(tok)
            yield (torch.stack(images), torch.stack(tokens),
                   torch.tensor([worker, pos, skipped, self._errors[0]]))


def train_loader(spec: StreamSpec, preprocess, tokenizer, pin_memory: bool = False,
                 timeout: float = 0) -> DataLoader:
    """``timeout`` (seconds, with worker processes): a batch not ready by then raises instead of waiting."""
    ds = TrainStream(spec, preprocess, tokenizer)
    kw = {}
    if spec.num_workers > 0:
        kw = dict(persistent_workers=False, prefetch_factor=4, timeout=timeout)
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

