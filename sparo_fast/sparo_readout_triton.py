"""The ``triton`` backend: fused kernels from ``sparo_fast_kernels`` behind PyTorch ops.

``sparo_triton`` calls ``torch.ops.sparo_fast.readout_fwd`` on the published parameters (one
PyTorch matmul for the absorbed query and two Triton launches); its registered backward is
three Triton launches that also produce the parameters' gradients (``q_emb``, the shared or
separate key/value weights, ``proj``). See ``kernels/sparo_readout_fwd.py``, ``kernels/sparo_readout_bwd.py``
and ``kernels/sparo_readout_op.py`` for the design.

Inputs the kernels cannot take (a dtype other than float16/bfloat16/float32, more than
``MAX_SLOTS`` slots, a value width over ``MAX_VALUE_DIM``) fall back to the torch backend
(``sparo_fast.functional.sparo_absorbed``) with a one-time warning per reason: never a wrong
answer. A device where the kernels cannot run at all (see ``is_available``) is an error.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import sparo_absorbed
from .params import ReadoutParams

_warned: set = set()
_KERNELS_MODULE = "sparo_fast_kernels.sparo_readout_op"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def is_available(device) -> bool:
    """True on CUDA when Triton imports; on CPU only under ``TRITON_INTERPRET=1``.

    Never queries the device. On CPU the kernels must also have been (or be about to be)
    defined under the interpreter: the variable is read when the kernel module is imported.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_importable()
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1" or not _triton_importable():
            return False
        mod = sys.modules.get(_KERNELS_MODULE)
        return mod is None or bool(mod.INTERPRETED)
    return False


def _ops():
    from sparo_fast_kernels import sparo_readout_op as ops

    return ops


def unsupported_reason(x: Tensor, q_emb: Tensor, v_weight: Tensor) -> Optional[str]:
    """Why the kernels cannot take these inputs, or None when they can."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype} (the kernels take float16, bfloat16, float32)"
    ops = _ops()
    _, n_heads, n_sub, _, _ = q_emb.shape
    L = n_heads * n_sub
    if L > ops.MAX_SLOTS:
        return f"L={L} slots (the kernels take at most {ops.MAX_SLOTS})"
    vd = v_weight.shape[0] // n_heads
    if vd > ops.MAX_VALUE_DIM:
        return f"value_dim={vd} (the kernels take at most {ops.MAX_VALUE_DIM})"
    return None


def _warn_once(reason: str) -> None:
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    warnings.warn(f"SparoReadout: the triton backend cannot take {reason}; "
                  "falling back to the torch backend", RuntimeWarning, stacklevel=3)


def sparo_triton(
    x: Tensor,
    eos_indices: Optional[Tensor],
    params: ReadoutParams,
    need_weights: bool = True,
) -> Tuple[Tensor, Optional[Tensor]]:
    """SPARO read-out through the fused Triton kernels; same contract as ``sparo_absorbed``."""
    if not is_available(x.device):
        raise RuntimeError(
            f"SparoReadout: the 'triton' backend is not available on {x.device} (it needs Triton and a CUDA "
            "device, or TRITON_INTERPRET=1 set before import on the CPU); use backend='torch' or 'auto'")
    q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias = params
    reason = unsupported_reason(x, q_emb, v_weight)
    if reason is not None:
        _warn_once(reason)
        return sparo_absorbed(x, eos_indices, params, need_weights=need_weights)
    _ops()  # registers torch.ops.sparo_fast.*
    out, attn, _, _, _, _ = torch.ops.sparo_fast.readout_fwd(
        x, eos_indices, q_emb, k_weight, k_bias, v_weight, v_bias, proj_weight, proj_bias, bool(need_weights))
    return out, (attn if need_weights else None)
