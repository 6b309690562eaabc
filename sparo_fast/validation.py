"""Input checks for the read-out: every bad input gets an error that names what is wrong."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_config(dim: int, L: int, V: int, attn_dim: int, value_dim: int, num_heads: int,
                 share_kv: bool) -> None:
    for name, val in (("dim", dim), ("L", L), ("V", V), ("attn_dim", attn_dim),
                      ("value_dim", value_dim), ("num_heads", num_heads)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"SparoReadout: {name} must be a positive integer, got {val!r}")
    if L % num_heads != 0:
        raise ValueError(f"SparoReadout: L={L} slots must be divisible by num_heads={num_heads}")
    if share_kv and value_dim != attn_dim:
        raise ValueError(
            f"SparoReadout: share_kv=True needs value_dim == attn_dim, got value_dim={value_dim}, "
            f"attn_dim={attn_dim} (pass share_kv=False for a separate value projection)")


def check_input(x: Tensor, dim: int, eos_indices: Optional[Tensor], *, check_values: bool,
                check_finite: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"SparoReadout: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"SparoReadout: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"SparoReadout: x must be 3-D [batch, tokens, dim], got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if D != dim:
        raise ValueError(f"SparoReadout: x's last dimension is {D}, the module was built for dim={dim}")
    if N == 0:
        raise ValueError("SparoReadout: x has no tokens (N = 0); the softmax over tokens is undefined")
    if check_finite and B > 0 and not bool(torch.isfinite(x).all()):
        raise ValueError("SparoReadout: x contains NaN or infinite values")
    if eos_indices is None:
        return
    if not isinstance(eos_indices, Tensor):
        raise TypeError(f"SparoReadout: eos_indices must be a torch.Tensor, got {type(eos_indices).__name__}")
    if eos_indices.dtype.is_floating_point or eos_indices.dtype.is_complex or eos_indices.dtype == torch.bool:
        raise TypeError(f"SparoReadout: eos_indices must be an integer tensor, got {eos_indices.dtype}")
    if eos_indices.shape != (B,):
        raise ValueError(
            f"SparoReadout: eos_indices must have shape [batch] = [{B}], got {tuple(eos_indices.shape)}")
    if eos_indices.device != x.device:
        raise ValueError(
            f"SparoReadout: eos_indices is on {eos_indices.device}, x is on {x.device}")
    if check_values and B > 0:
        lo, hi = int(eos_indices.min()), int(eos_indices.max())
        if lo < 0 or hi > N - 1:
            raise ValueError(
                f"SparoReadout: eos_indices must lie in [0, N-1] = [0, {N - 1}], got values in [{lo}, {hi}]")
