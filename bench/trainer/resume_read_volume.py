"""Bytes read from the shards until the first batch after a mid-epoch resume, before and after fast resume.

Before (the previous resume regenerated each reader's stream from the start of the epoch and discarded
what was consumed): exactly the bytes an uninterrupted run reads up to that batch. After: the bytes the
resumed reader reads (the shuffle buffer's samples fetched by byte range, the headers of the shards it
enters, then the rest). Counted by wrapping the shard file objects; not a timing.

    python bench/trainer/resume_read_volume.py [--samples 8000] [--shard-size 1000] [--batch-size 64] [--step 62]
"""
import argparse
import os
import sys
import tempfile
import time

import torch

from sparo_fast_training import data, synthetic


class Counting:
    nbytes = 0

    def __init__(self, path):
        self.f = open(path, "rb")

    def read(self, n=-1):
        b = self.f.read(n)
        Counting.nbytes += len(b)
        return b

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def tok(texts):
    return torch.zeros(len(texts), 77, dtype=torch.long)


def pre(img):
    return torch.zeros(1)  # decoding is not what is measured


def first_batch_after(urls, args, start, positions):
    spec = data.StreamSpec(urls=urls, seed=0, epoch=0, rank=0, world_size=1, num_workers=1,
                           batch_size=args.batch_size, batches_per_rank=args.samples // args.batch_size,
                           start_batch=start, positions=positions, skipped=[0], shuffle_buffer=args.shuffle_buffer)
    it = iter(data.TrainStream(spec, pre, tok))
    Counting.nbytes = 0
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(args.step + 1 - start)]
    return Counting.nbytes, time.perf_counter() - t0, batches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--step", type=int, default=62, help="resume after this many batches")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sparo_bench_data"))
    args = ap.parse_args(argv)
    d = synthetic.ensure_synthetic(args.cache, args.samples, 64, shard_size=args.shard_size, log=print)
    urls = data.expand_urls(d["train"])
    data._open_local = Counting
    before, t_before, full = first_batch_after(urls, args, 0, [0])
    pos = full[args.step - 1][2].tolist()[1]
    after, t_after, rest = first_batch_after(urls, args, args.step, [pos])
    same = torch.equal(full[-1][2], rest[-1][2])
    print(f"{len(urls)} shards, {args.samples} samples, batch {args.batch_size}, shuffle buffer {args.shuffle_buffer}; "
          f"resume after batch {args.step} ({pos} samples consumed)")
    print(f"bytes read to the first resumed batch: before {before:,} ({t_before:.2f} s), after {after:,} "
          f"({t_after:.2f} s, wall clock of a loaded machine), ratio {before / max(after, 1):.1f}x; "
          f"same batch: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
