"""Backend registry: one function signature (see ``functional.py``), three implementations."""
from __future__ import annotations

from typing import Callable

import torch

from .functional import sparo_absorbed, sparo_reference

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """True where the fused kernels can run: a CUDA device, or the Triton CPU interpreter."""
    from . import triton_backend

    return triton_backend.is_available(device)


def resolve(name: str, device: torch.device) -> str:
    """Concrete backend for a call: ``auto`` takes triton on CUDA tensors, torch otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown SPARO backend {name!r}; choose one of {BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    return name


def get(name: str) -> Callable:
    if name == "reference":
        return sparo_reference
    if name == "torch":
        return sparo_absorbed
    if name == "triton":
        from .triton_backend import sparo_triton

        return sparo_triton
    raise ValueError(f"unknown SPARO backend {name!r}; choose one of {BACKENDS[1:]}")
