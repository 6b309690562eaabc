"""``ReadoutParams``: the read-out's seven parameter tensors as one named value.

Every backend (``functional.sparo_reference``, ``functional.sparo_absorbed``,
``sparo_readout_triton.sparo_triton``) and every benchmark peer takes one ``ReadoutParams`` instead
of seven positional tensors, so the order is written down once, here.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor


class ReadoutParams(NamedTuple):
    """Published parameter layout: ``q_emb [1, Hh, S, 1, A]``, ``k``/``v``/``proj`` linears."""

    q_emb: Tensor
    k_weight: Tensor
    k_bias: Tensor
    v_weight: Tensor
    v_bias: Tensor
    proj_weight: Tensor
    proj_bias: Tensor

    @property
    def num_heads(self) -> int:
        return self.q_emb.shape[1]

    @property
    def num_subheads(self) -> int:
        return self.q_emb.shape[2]

    @property
    def num_slots(self) -> int:
        return self.num_heads * self.num_subheads

    @property
    def attn_dim(self) -> int:
        return self.q_emb.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v_weight.shape[0] // self.num_heads

    def cast(self, dtype: Optional[torch.dtype]) -> "ReadoutParams":
        """The same parameters in ``dtype`` (tensors already in it are kept, not copied).

        A tensor that appears twice (``v`` is ``k`` under ``share_kv``) is cast once and stays
        one tensor, so the cast costs one copy (and one gradient cast back) and the backends'
        shared-weight paths (``k_weight is v_weight``) still apply under autocast."""
        if dtype is None:
            return self
        done: Dict[int, Tensor] = {}
        out = []
        for p in self:
            if p.dtype != dtype and id(p) not in done:
                done[id(p)] = p.to(dtype)
            out.append(done.get(id(p), p))
        return ReadoutParams(*out)
