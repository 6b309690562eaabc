"""Concept selection: ranking a SPARO model's slots by image-text alignment on paired data.

The selection itself (validating slot indices, zeroing the others) lives in ``slots.py``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .factory import tokenizer_for

class SlotRanking(NamedTuple):
    """``indices``: slot indices, best aligned first; ``scores[i]``: mean cosine of slot ``indices[i]``."""
    indices: Tensor
    scores: Tensor


@torch.no_grad()
def slot_alignment(model, images: Tensor, texts, *, batch_size: int = 256) -> Tensor:
    """Per-slot mean cosine similarity between image slot l and text slot l over paired data: [L]."""
    if not getattr(model, "use_sparo", False):
        raise ValueError("rank_slots needs a SPARO model (this model has no slots)")
    if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str)):
        texts = tokenizer_for(model)(list(texts) if not isinstance(texts, str) else [texts])
    if not isinstance(images, Tensor) or not isinstance(texts, Tensor):
        raise TypeError("rank_slots: images must be a tensor and texts a tensor of token ids (or strings)")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"rank_slots: {images.shape[0]} images but {texts.shape[0]} texts; they must be paired")
    if images.shape[0] == 0:
        raise ValueError("rank_slots: no data (empty batch)")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"rank_slots: batch_size must be a positive integer, got {batch_size!r}")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        total = None
        for i in range(0, images.shape[0], batch_size):
            img = images[i:i + batch_size].to(param.device)
            if img.is_floating_point() and img.dtype != param.dtype:
                img = img.to(param.dtype)
            txt = texts[i:i + batch_size].to(param.device)
            a = model.encode_image(img, normalize=True, return_sparo=True)
            b = model.encode_text(txt, normalize=True, return_sparo=True)
            cos = F.cosine_similarity(a.double(), b.double(), dim=-1).sum(0)  # [L]
            total = cos if total is None else total + cos
    finally:
        model.train(was_training)
    return total / images.shape[0]


def rank_slots(model, images: Tensor, texts, *, batch_size: int = 256) -> SlotRanking:
    """Rank a SPARO model's slots by how well image and text slots align on paired data.

    For each slot l, the score is the mean over pairs of cos(image_slot_l, text_slot_l) (the
    published concept-selection signal); slots are returned best first (ties keep slot order).
    ``texts`` are token ids [B, context] or strings (tokenised with the model's context length).
    The model runs in eval mode (restored afterwards) and without gradients.
    """
    scores = slot_alignment(model, images, texts, batch_size=batch_size)
    order = torch.sort(scores, descending=True, stable=True)
    return SlotRanking(order.indices, order.values)
