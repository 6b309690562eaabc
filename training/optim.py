"""AdamW with OpenCLIP's weight-decay rule and OpenCLIP's learning-rate schedules."""
from __future__ import annotations

import torch
from torch import nn

NO_DECAY_WORDS = ("bn", "ln", "bias", "logit_scale")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """OpenCLIP's rule (open_clip_train.main): no decay for parameters with fewer than 2 dimensions or
    whose name contains bn/ln/bias/logit_scale. Embeddings (positional, token, the SPARO queries) are
    matrices and are decayed, as in OpenCLIP and the published SPARO code."""
    return p.ndim < 2 or any(w in name for w in NO_DECAY_WORDS)


def create_optimizer(model: nn.Module, lr: float, wd: float, betas=(0.9, 0.98), eps: float = 1e-6):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    replicated = {id(p) for p in getattr(model, "_sparo_replicated", [])}
    if replicated:  # plain tensors beside FSDP2's DTensors: a group of their own (one fused kernel per kind)
        groups[0]["params"] = [p for p in no_decay if id(p) not in replicated]
        groups.append({"params": [p for p in no_decay if id(p) in replicated], "weight_decay": 0.0})
    # fused: one kernel over all local shards (DTensors or plain tensors), CPU and CUDA; measured
    # 3-7x faster than foreach over FSDP2 DTensors on the CPU (bench/trainer/NOTES.md)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def make_scheduler(args, optimizer, base_lr: float, steps_per_epoch: int, total_steps: int):
    """OpenCLIP's schedule functions (open_clip_train.scheduler): ``step -> lr`` (also sets the lr)."""
    from open_clip_train import scheduler as S

    if args.skip_scheduler:
        return lambda step: (set_lr(optimizer, base_lr), base_lr)[1]
    if args.lr_scheduler == "cosine":
        return S.cosine_lr(optimizer, base_lr, args.warmup, total_steps)
    if args.lr_scheduler == "const":
        return S.const_lr(optimizer, base_lr, args.warmup, total_steps)
    cooldown = steps_per_epoch * args.epochs_cooldown
    return S.const_lr_cooldown(optimizer, base_lr, args.warmup, total_steps, cooldown, args.lr_cooldown_power,
                               args.lr_cooldown_end)


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
