"""The absorbed query cached per weight version, for the no-grad (inference) path.

``qt = W_K[h]^T q_l`` ([L, D], unscaled: the kernels apply ``1/sqrt(A)``) depends on the weights
only, yet the training forward recomputes it every call (one small kernel reading all of
``W_K``: 6.3 MB at vit_b16 in fp16, 0.07x the forward floor). Between optimizer steps every call
gets the same ``qt``, so the inference path keeps it.

Validity: the key holds, for ``q_emb`` and ``k.weight``, the tensor's identity, data pointer,
version counter (bumped by every in-place write: optimizer steps, ``load_state_dict``'s
``copy_``, ``p.data.add_()``...), dtype, device, shape and strides, plus the compute dtype. Any
change recomputes. ``SparoReadout`` also clears the cache on ``.to()``/``.cuda()``/``.half()``
(``_apply``) and ``load_state_dict``, so reused memory with a fresh version counter cannot alias
an old entry. The value is computed under ``no_grad`` and only ever used where autograd records
nothing: with gradients the training op recomputes ``qt`` from ``q_emb`` and ``W_K`` so that its
backward reaches them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def unscaled_absorbed_query(q_emb: Tensor, k_weight: Tensor) -> Tensor:
    """``qt [L, D] = W_K[h]^T q_l``: the same product, in the same dtype, as the training op's."""
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    q = q_emb.reshape(n_heads, n_sub, attn_dim)
    return torch.matmul(q, k_weight.view(n_heads, attn_dim, -1)).reshape(n_heads * n_sub, -1)


def _tensor_key(t: Tensor) -> Optional[Tuple]:
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor has no version counter: never cached
        return None
    return (id(t), t.data_ptr(), version, t.dtype, t.device, tuple(t.shape), t.stride())


class AbsorbedQueryCache:
    """One ``qt`` entry, keyed on the weight versions (see the module docstring)."""

    def __init__(self) -> None:
        self._key: Optional[Tuple] = None
        self._value: Optional[Tensor] = None
        self.computed = 0  # how many times qt was (re)computed: tests and diagnostics

    def clear(self) -> None:
        self._key = self._value = None

    def get(self, q_emb: Tensor, k_weight: Tensor, dtype: torch.dtype) -> Tensor:
        """``qt`` in ``dtype`` for the current values of the two master parameters."""
        qk, kk = _tensor_key(q_emb), _tensor_key(k_weight)
        key = None if qk is None or kk is None else (qk, kk, dtype)
        if key is None or key != self._key:
            with torch.no_grad():
                self._value = unscaled_absorbed_query(q_emb.to(dtype), k_weight.to(dtype))
            self._key = key
            self.computed += 1
        return self._value
