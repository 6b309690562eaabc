"""One optimizer step (with contrastive gradient accumulation) and the loss."""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _set_sync(model: nn.Module, on: bool) -> None:
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(on)


def grad_norm_(params: Sequence[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Global gradient norm over all shards (and clipping when ``max_norm``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total,
                                             foreach=True)
    return total


def train_step(model: nn.Module, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]], loss_fn, optimizer,
               grad_clip_norm: Optional[float] = None,
               autocast: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    With one micro-batch: the usual step. With several (OpenCLIP's feature caching): a first
    no-grad pass caches every micro-batch's features, then each micro-batch is re-forwarded with
    grad and its loss is computed against the cached features of the others, so the negatives span
    the whole accumulated batch and the summed gradient equals that of the full-batch loss. The
    logit scale sees the whole batch in each of the K re-forwards: its gradient is scaled by 1/K
    there (value unchanged), so it is counted once, as in the full-batch loss.
    ``autocast``: run forwards and losses under ``torch.autocast`` with this dtype (amp_bf16).
    Returns ``(loss, grad_norm)`` (detached; the loss of the whole accumulated batch).
    """
    def amp():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(micro_batches[0][0].device.type, dtype=autocast)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    k = len(micro_batches)
    if k == 1:
        images, texts = micro_batches[0]
        with amp():
            out = model(images, texts)
            loss = loss_fn(_as_float(out["image_features"]), _as_float(out["text_features"]),
                           _as_float(out["logit_scale"]))
        loss.backward()
    else:
        cached_img, cached_txt = [], []
        with torch.no_grad(), amp():
            for images, texts in micro_batches:
                out = model(images, texts)
                cached_img.append(_as_float(out["image_features"]))
                cached_txt.append(_as_float(out["text_features"]))
        for j, (images, texts) in enumerate(micro_batches):
            _set_sync(model, j == k - 1)  # FSDP2: reduce-scatter once, after the last micro-batch
            with amp():
                out = model(images, texts)
                img = torch.cat(cached_img[:j] + [_as_float(out["image_features"])] + cached_img[j + 1:])
                txt = torch.cat(cached_txt[:j] + [_as_float(out["text_features"])] + cached_txt[j + 1:])
                s = _as_float(out["logit_scale"])
                s = s / k + s.detach() * (1.0 - 1.0 / k)
                loss = loss_fn(img, txt, s)
            loss.backward()
        _set_sync(model, True)
    gnorm = grad_norm_(params, grad_clip_norm)
    optimizer.step()
    with torch.no_grad():  # OpenCLIP clamps the (log) temperature to ln(100)
        model.logit_scale.clamp_(0, math.log(100))
    return loss.detach(), gnorm.detach()


def make_loss(local_loss: bool, gather_with_grad: bool, rank: int, world_size: int):
    from open_clip import ClipLoss

    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank,
                    world_size=world_size)
