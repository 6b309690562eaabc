"""Concept selection: choosing a subset of SPARO slots, and ranking slots by image-text alignment."""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

SlotsArg = Optional[Union[Sequence[int], Tensor]]


def check_slots(slots: SlotsArg, L: int) -> Optional[tuple]:
    """Validate a slot subset; returns it as a tuple of ints (None stays None).

    Slots are indices in ``[0, L)``: a non-empty sequence (list, tuple, range, 1-D integer
    tensor) with no duplicates. Negative indices are rejected rather than wrapped, so that an
    off-by-one in a caller cannot silently select the last slot.
    """
    if slots is None:
        return None
    if isinstance(slots, Tensor):
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise TypeError(f"slots must hold integers, got a {slots.dtype} tensor")
        if slots.dim() != 1:
            raise ValueError(f"slots must be 1-D, got a tensor of shape {tuple(slots.shape)}")
        values = [int(v) for v in slots.tolist()]
    elif isinstance(slots, (str, bytes)) or not hasattr(slots, "__iter__"):
        raise TypeError(f"slots must be a sequence of slot indices, got {type(slots).__name__}")
    else:
        values = []
        for v in slots:
            if isinstance(v, Tensor) and v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool:
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int):
                if hasattr(v, "__index__") and not isinstance(v, bool):  # numpy integers
                    v = int(v.__index__())
                else:
                    raise TypeError(f"slots must be integers, got {v!r} ({type(v).__name__})")
            values.append(v)
    if not values:
        raise ValueError("slots must select at least one slot (got an empty selection)")
    bad = [v for v in values if not 0 <= v < L]
    if bad:
        raise ValueError(f"slot indices must lie in [0, {L - 1}] (the model has L={L} slots), got {bad}")
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"slots contains duplicate indices {dup}")
    return tuple(values)


def select_slots(weighted: Tensor, slots: Optional[tuple]) -> Tensor:
    """Zero the slots not in ``slots`` of normalised slots ``[..., L, V]`` and re-normalise so
    that the flattened embedding has unit norm again. The shape is kept ([..., L, V]), so an
    embedding with a selection stays comparable (same layout) with any other embedding."""
    if slots is None:
        return weighted
    L = weighted.shape[-2]
    keep = torch.zeros(L, dtype=weighted.dtype, device=weighted.device)
    keep[list(slots)] = 1
    sel = weighted * keep[:, None]
    norm = torch.linalg.vector_norm(sel.flatten(-2), dim=-1)
    return sel / norm.clamp_min(1e-12)[..., None, None]


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
        from .factory import tokenizer_for

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
