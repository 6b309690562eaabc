"""The ``triton`` backend: fused kernels from ``sparo_fast_kernels`` (filled in by the kernels work)."""
from __future__ import annotations

import torch


def is_available(device: torch.device) -> bool:
    return False


def sparo_triton(*args, **kwargs):
    raise RuntimeError("SparoReadout: the 'triton' backend is not available in this build; "
                       "use backend='torch' or 'auto'")
