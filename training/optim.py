"""AdamW with OpenCLIP's weight-decay exclusions and the cosine schedule with linear warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_WORDS = ("bn", "ln", "bias", "logit_scale", "logit_bias", "embedding")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Gains (norm weights), biases, embeddings, logit scale/bias: no decay (OpenCLIP's rule, plus embeddings)."""
    return p.ndim < 2 or any(w in name for w in NO_DECAY_WORDS)


def create_optimizer(model: nn.Module, lr: float, wd: float, betas=(0.9, 0.98), eps: float = 1e-6):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    # foreach: one fused loop over the local shards (DTensors) instead of a Python loop per tensor
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """OpenCLIP's schedule: linear warm-up to ``base_lr`` then cosine decay to 0 at ``total_steps``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e = step - warmup
    es = max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
