"""Slot normalisation (the published ``sparo_type = "<rep>:<norm>"``) into a unit-norm embedding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

REPS = ("cont", "sem", "sqrtsem")
NORMS = ("const", "norm", "softmax", "sqrtsoftmax")
SPARO_TYPES = tuple(f"{r}:{n}" for r in REPS for n in NORMS if not (r == "sem" and n == "norm"))


def parse_sparo_type(sparo_type: str):
    if not isinstance(sparo_type, str) or sparo_type.count(":") != 1:
        raise ValueError(f"sparo_type must look like '<rep>:<norm>', got {sparo_type!r}")
    rep, norm = sparo_type.split(":")
    if sparo_type not in SPARO_TYPES:
        raise ValueError(f"unsupported sparo_type {sparo_type!r}; supported: {', '.join(SPARO_TYPES)}")
    return rep, norm


def extra_channels(sparo_type: str) -> int:
    """1 when the read-out emits a per-slot weight logit in channel 0 (the softmax kinds)."""
    return 1 if parse_sparo_type(sparo_type)[1].endswith("softmax") else 0


def normalize_slots(out: Tensor, sparo_type: str = "cont:const") -> Tensor:
    """Normalise read-out slots ``out [..., L, V(+1)]`` into weighted slots ``[..., L, V]``.

    Flattening the result over the last two dimensions gives the unit-norm embedding.
    With a ``softmax`` norm, channel 0 of each slot is its weight logit (softmax across
    slots) and the slot itself is channels 1..V.
    """
    rep, norm = parse_sparo_type(sparo_type)
    if out.dim() < 2:
        raise ValueError(f"normalize_slots: expected [..., L, V], got shape {tuple(out.shape)}")
    if norm.endswith("softmax"):
        if out.shape[-1] < 2:
            raise ValueError(f"normalize_slots: {sparo_type!r} needs V+1 >= 2 channels per slot")
        logits, x = out[..., :1], out[..., 1:]
        w = F.softmax(logits, dim=-2)
        weights = torch.sqrt(w) if norm == "sqrtsoftmax" else F.normalize(w, dim=-2)
    else:
        x = out
        if norm == "const":
            weights = torch.full_like(x[..., :1], x.shape[-2] ** -0.5)
        else:  # "norm": each slot weighted by its share of the total norm
            norm_in = x if rep == "cont" else torch.exp(x / 2.0)
            slot_norm = torch.linalg.vector_norm(norm_in, dim=-1, keepdim=True)
            weights = slot_norm / torch.linalg.vector_norm(slot_norm, dim=-2, keepdim=True)
    if rep == "cont":
        rep_x = F.normalize(x, dim=-1)
    elif rep == "sqrtsem":
        rep_x = torch.sqrt(F.softmax(x, dim=-1))
    else:
        rep_x = F.normalize(F.softmax(x, dim=-1), dim=-1)
    return rep_x * weights
