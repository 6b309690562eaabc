"""Data set-up at start: which shards, how many samples per epoch, the evaluation shards, source weights; every
shard opened and its first sample read (``data.check_shards``), so a bad data set stops before the first step."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from . import data as data_mod
from . import distributed as D
from . import synthetic
from .errors import Fatal

log = logging.getLogger("sparo_fast_training")


@dataclass
class DataPlan:
    sources: List[List[str]]         # shard URLs per '::' source
    num_samples: int                 # samples per epoch
    val_urls: Optional[List[str]]    # evaluation shards (None: no pair evaluation)
    weights: Optional[List[float]]   # per shard, with --train-data-upsampling-factors
    default_lr: Optional[float]      # the built-in set's learning rate (None: OpenCLIP's for the model)

    @property
    def train_urls(self) -> List[str]:
        return [u for s in self.sources for u in s]


def _synthetic(args, info):
    # one generator per node (the cache is node-local); the others wait, then find it complete
    def make():
        return synthetic.ensure_synthetic(args.data_cache_dir, args.synthetic_train_samples,
                                          args.synthetic_val_samples, seed=0, log=log.info,
                                          shard_size=args.synthetic_shard_size)
    d = make() if info.local_rank == 0 else None
    dist.barrier()
    return d or make()


def resolve(args, info) -> DataPlan:
    if args.train_data is None:
        d = _synthetic(args, info)
        plan = DataPlan([data_mod.expand_urls(d["train"])], args.train_num_samples or d["train_num_samples"],
                        data_mod.expand_urls(args.val_data or d["val"]), None, 1e-3)
    else:
        plan = DataPlan([data_mod.expand_urls(s) for s in args.train_data.split("::")], 0,
                        data_mod.expand_urls(args.val_data) if args.val_data else None, None, None)
    why = None
    if info.rank == 0:  # one reader of every shard's first sample, not one per rank
        try:
            data_mod.check_shards(plan.train_urls, "--train-data")
            if plan.val_urls is not None:
                data_mod.check_shards(plan.val_urls, "--val-data")
        except data_mod.DataError as e:
            why = str(e)
    why = D.broadcast_object(why)
    if why:
        raise Fatal(why)
    if not plan.num_samples:
        plan.num_samples = args.train_num_samples or data_mod.count_samples(plan.train_urls) or 0
        if not plan.num_samples:
            raise Fatal("--train-data: give --train-num-samples (no sizes.json beside the shards)")
    if args.train_data_upsampling_factors:
        f = [float(x) for x in args.train_data_upsampling_factors.split("::")]
        if len(f) != len(plan.sources):
            raise Fatal(f"--train-data-upsampling-factors: {len(f)} factors for {len(plan.sources)} sources")
        plan.weights = [w for w, s in zip(f, plan.sources) for _ in s]
    return plan
