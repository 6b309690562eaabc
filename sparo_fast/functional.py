"""SPARO read-out as plain functions: the published math and the absorbed formulation.

Every backend takes the same arguments ``(x, eos_indices, params: ReadoutParams,
need_weights)`` and returns ``(out [B, L, V], attn [B, L, N] or None)``; see docs/DESIGN.md ("The absorbed formulation") for the
derivation of the absorbed form.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .params import ReadoutParams


def eos_mask(eos_indices: Optional[Tensor], n_tokens: int, device) -> Optional[Tensor]:
    """Boolean [B, N] mask, True where a token lies after its sequence's EOS (masked out)."""
    if eos_indices is None:
        return None
    return torch.arange(n_tokens, device=device)[None, :] > eos_indices[:, None]


def sparo_reference(
    x: Tensor,
    eos_indices: Optional[Tensor],
    params: ReadoutParams,
    need_weights: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """The published computation, keys and values materialised: the gradient-check oracle."""
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    B, N, _ = x.shape
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    value_dim = v_weight.shape[0] // n_heads
    n_slots = n_heads * n_sub
    k = torch.nn.functional.linear(x, k_weight, k_bias)
    v = torch.nn.functional.linear(x, v_weight, v_bias)
    # [B, Hh, 1, N, A]: one key/value head shared by its S sub-slots (broadcast, as published)
    k = k.view(B, N, n_heads, 1, attn_dim).permute(0, 2, 3, 1, 4)
    v = v.view(B, N, n_heads, 1, value_dim).permute(0, 2, 3, 1, 4)
    scores = (q_emb * attn_dim**-0.5) @ k.transpose(-2, -1)  # [B, Hh, S, 1, N]
    mask = eos_mask(eos_indices, N, x.device)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, None, :], float("-inf"))
    attn = scores.softmax(dim=-1)
    pooled = (attn @ v).reshape(B, n_slots, value_dim)
    out = torch.nn.functional.linear(pooled, proj_weight, proj_bias)
    return out, (attn.reshape(B, n_slots, N) if need_weights else None)


def absorbed_query(q_emb: Tensor, k_weight: Tensor) -> Tensor:
    """qt [L, D] = W_K[h]^T q_l / sqrt(A): the key projection folded into each slot's query."""
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    q = q_emb.reshape(n_heads, n_sub, attn_dim)
    wk = k_weight.view(n_heads, attn_dim, -1)
    return torch.matmul(q, wk).reshape(n_heads * n_sub, -1) * attn_dim**-0.5


def absorbed_query_bias(q_emb: Tensor, k_bias: Tensor) -> Tensor:
    """c [L] = q_l . b_K[h] / sqrt(A): a per-slot score offset (cancels in the softmax)."""
    _, n_heads, n_sub, _, attn_dim = q_emb.shape
    q = q_emb.reshape(n_heads, n_sub, attn_dim)
    return (q * k_bias.view(n_heads, 1, attn_dim)).sum(-1).reshape(-1) * attn_dim**-0.5


def sparo_absorbed(
    x: Tensor,
    eos_indices: Optional[Tensor],
    params: ReadoutParams,
    need_weights: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Absorbed formulation in PyTorch ops: never builds the [B, N, Hh*A] key/value tensors.

    The key bias only adds a per-slot constant c_l to the scores, which the softmax
    cancels; it is still added (an L-vector, free) so that ``k.bias`` gets its gradient,
    zero up to rounding, exactly like the published module.
    Low-precision inputs keep their dtype in the matrix products; the softmax runs in
    float32 and the probabilities are cast back, as SDPA-style kernels do.
    """
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    B, N, D = x.shape
    _, n_heads, n_sub, _, _ = q_emb.shape
    n_slots = n_heads * n_sub
    value_dim = v_weight.shape[0] // n_heads
    qt = absorbed_query(q_emb, k_weight)  # [L, D]
    c = absorbed_query_bias(q_emb, k_bias)  # [L]
    scores = torch.baddbmm(c.view(1, n_slots, 1).to(x.dtype), qt.expand(B, -1, -1), x.transpose(1, 2))
    mask = eos_mask(eos_indices, N, x.device)
    if mask is not None:  # eos < 0 (checks off) masks every token: NaN rows, on every backend
        scores = scores.masked_fill(mask[:, None, :], float("-inf"))
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    attn = torch.softmax(scores, dim=-1, dtype=torch.float32 if low_precision else x.dtype).to(x.dtype)
    pooled_x = torch.matmul(attn, x)  # [B, L, D]: sum_n p x_n, the pooled token
    # per-head value projection of the pooled rows: [Hh, B*S, D] x [Hh, D, Vd]
    px = pooled_x.view(B, n_heads, n_sub, D).permute(1, 0, 2, 3).reshape(n_heads, B * n_sub, D)
    wv = v_weight.view(n_heads, value_dim, D)
    o = torch.baddbmm(v_bias.view(n_heads, 1, value_dim), px, wv.transpose(1, 2))
    o = o.view(n_heads, B, n_sub, value_dim).permute(1, 0, 2, 3).reshape(B, n_slots, value_dim)
    # baddbmm, not F.linear: linear on 3-D input returns a view, which FSDP2 warns about
    out = torch.baddbmm(proj_bias.view(1, 1, -1), o, proj_weight.t().expand(B, -1, -1))
    return out, (attn if need_weights else None)
