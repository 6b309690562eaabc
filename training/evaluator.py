"""Evaluation during a run, on OpenCLIP's schedule and with OpenCLIP's metric names.

At the end of epoch ``e`` (counted from 1, as ``open_clip_train``): the pairs of ``--val-data`` when
``--val-frequency`` is non-zero and divides ``e`` or ``e`` is the last epoch; ImageNet zero-shot likewise with
``--zeroshot-frequency``. A frequency of 0 means never. Each evaluation appends one line to
``checkpoints/results.jsonl`` (OpenCLIP's file and keys: ``clip_val_loss``, ``image_to_text_R@1`` ...,
``imagenet-zeroshot-val-top1``, ``epoch``, ``num_samples``) and a row to ``metrics.jsonl``; this project's
extra metrics (``swap_accuracy``, ``zeroshot_color_top1`` ...) keep their own names.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Dict, Optional

import torch

from . import data as data_mod
from . import evaluate as ev
from .errors import Fatal

log = logging.getLogger("sparo_fast_training")


def due(frequency: int, epoch: int, epochs: int) -> bool:
    """OpenCLIP's rule (``open_clip_train.train.evaluate`` / ``zero_shot_eval``)."""
    return bool(frequency) and (epoch % frequency == 0 or epoch == epochs)


def check_imagenet(root: Optional[str]) -> None:
    """--imagenet-val must be an ImageFolder tree with OpenCLIP's 1000 classes (checked at start)."""
    if not root:
        return
    try:
        ev.imagenet_folder(root, None)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise Fatal(str(e).splitlines()[0]) from None


class Evaluator:
    def __init__(self, args, info, device, model, tokenizer, preprocess, val_urls, image_size: int,
                 context_length: int, results_dir: str, metrics):
        self.args, self.info, self.device, self.model = args, info, device, model
        self.tokenizer, self.preprocess = tokenizer, preprocess
        self.image_size, self.context_length = image_size, context_length
        self.results_path = os.path.join(results_dir, "results.jsonl")
        self.metrics = metrics
        self.samples = None
        if not args.no_eval and val_urls is not None and args.val_frequency:
            # --val-num-samples only sizes the set in OpenCLIP (it never truncates it): the whole set is used
            self.samples = data_mod.load_eval_samples(val_urls, preprocess, tokenizer, info.rank,
                                                      info.world_size)

    def autocast(self, dtype):
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def at_epoch_end(self, epoch: int, step: int, autocast) -> Dict[str, float]:
        a = self.args
        val = self.samples is not None and due(a.val_frequency, epoch, a.epochs)
        zs = bool(a.imagenet_val) and due(a.zeroshot_frequency, epoch, a.epochs)
        return self.run(f"epoch {epoch}", epoch, step, autocast, val, zs) if (val or zs) else {}

    def run(self, tag: str, epoch: int, step: int, autocast, val: bool = True, zs: bool = True) -> Dict[str, float]:
        a = self.args
        if a.no_eval:
            return {}
        self.model.eval()
        res: Dict[str, float] = {}
        t0 = time.time()
        dummy = torch.zeros(3, self.image_size, self.image_size)
        with self.autocast(autocast):
            if zs and a.imagenet_val:
                res.update(ev.imagenet_zero_shot(self.model, self.tokenizer, a.imagenet_val, self.preprocess,
                                                 a.batch_size, a.workers, self.device, self.info.rank,
                                                 self.info.world_size))
            if val and self.samples is not None:
                res.update(ev.evaluate_pairs(self.model, self.samples, self.tokenizer, a.batch_size, self.device,
                                             dummy, self.context_length))
        self.model.train()
        if res:
            res.update(epoch=epoch)
            log.info(f"eval ({tag}, step {step}, {time.time() - t0:.1f}s): "
                     + "  ".join(f"{k} {v:.4f}" if abs(v) < 10 else f"{k} {v:.0f}" for k, v in res.items()))
            self.metrics.write("eval", step, res)
            if self.info.is_main:
                os.makedirs(os.path.dirname(self.results_path), exist_ok=True)
                with open(self.results_path, "a") as f:
                    f.write(json.dumps(res) + "\n")
        return res
