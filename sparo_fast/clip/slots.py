"""Slot subsets: validating a selection and applying it to normalised slots.

Shared by the model (``encode_image(..., slots=)``, ``set_active_slots``), concept selection
(``concepts.py``) and the visualiser; it depends on torch only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
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
