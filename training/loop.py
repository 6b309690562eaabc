"""One optimizer step (with contrastive gradient accumulation) and the loss."""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _set_sync(model: nn.Module, on: bool) -> None:
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(on)


def grad_norm_(params: Sequence[torch.Tensor], max_norm: Optional[float]) -> torch.Tensor:
    """Global gradient norm over all shards (and clipping when ``max_norm``). FSDP2's DTensor gradients and the
    plain replicated ones (the logit scale) are normed and clipped as separate lists (foreach kernels take
    one kind at a time), with one total."""
    with_grad = [p for p in params if p.grad is not None]
    kinds = [[p for p in with_grad if isinstance(p.grad, DTensor)],
             [p for p in with_grad if not isinstance(p.grad, DTensor)]]
    kinds = [k for k in kinds if k]
    if not kinds:
        return torch.zeros(())
    parts = []
    for k in kinds:
        n = torch.nn.utils.get_total_norm([p.grad for p in k], norm_type=2.0, foreach=True)
        parts.append((n.full_tensor() if isinstance(n, DTensor) else n).float().cpu())
    total = torch.stack(parts).square().sum().sqrt()
    if max_norm is not None and max_norm > 0:
        for k in kinds:
            torch.nn.utils.clip_grads_with_norm_(k, max_norm, total.to(k[0].grad.device), foreach=True)
    return total


def _average_replicated_grads(model: nn.Module) -> None:
    """The parameters FSDP2 leaves out (``fsdp.shard_model``'s logit scale) are averaged over the ranks here, as
    FSDP2 averages the others."""
    reps = [p for p in getattr(model, "_sparo_replicated", []) if p.grad is not None]
    if reps and dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in reps])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        i = 0
        for p in reps:
            p.grad.copy_(flat[i:i + p.grad.numel()].view_as(p.grad))
            i += p.grad.numel()


def train_step(model: nn.Module, micro_batches: List[Tuple[torch.Tensor, torch.Tensor]], loss_fn, optimizer,
               grad_clip_norm: Optional[float] = None,
               autocast: Optional[torch.dtype] = None, scaler=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward and optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    With one micro-batch: the usual step. With several (OpenCLIP's feature caching): a first
    no-grad pass caches every micro-batch's features, then each micro-batch is re-forwarded with
    grad and its loss is computed against the cached features of the others, so the negatives span
    the whole accumulated batch and the summed gradient equals that of the full-batch loss. The
    logit scale sees the whole batch in each of the K re-forwards: its gradient is scaled by 1/K
    there (value unchanged), so it is counted once, as in the full-batch loss.
    ``autocast``: run forwards and losses under ``torch.autocast`` with this dtype (amp_bf16, amp).
    ``scaler``: a ``torch.amp.GradScaler`` (amp): losses scaled, gradients unscaled before the norm, the step
    skipped on inf/NaN (FSDP2 uses the plain scaler: its unscale all-reduces the inf flag of DTensor gradients).
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
        (scaler.scale(loss) if scaler is not None else loss).backward()
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
            (scaler.scale(loss) if scaler is not None else loss).backward()
        _set_sync(model, True)
    _average_replicated_grads(model)
    if scaler is not None:
        scaler.unscale_(optimizer)
    gnorm = grad_norm_(params, grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():  # OpenCLIP clamps the (log) temperature to ln(100)
        model.logit_scale.clamp_(0, math.log(100))
    return loss.detach(), gnorm.detach()


def make_loss(local_loss: bool, gather_with_grad: bool, rank: int, world_size: int):
    from open_clip import ClipLoss

    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank,
                    world_size=world_size)
