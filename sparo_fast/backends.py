"""Backend registry: one function signature (see ``functional.py``), three implementations,
and the one place that validates backend names."""
from __future__ import annotations

from typing import Callable

import torch

from . import sparo_readout_triton as triton_backend
from .functional import sparo_absorbed, sparo_reference

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """True where the fused kernels can run: a CUDA device, or the Triton CPU interpreter."""
    return triton_backend.is_available(device)


def check_backend(name: str) -> str:
    """The one validator of backend names (module, CLIP models and trainer all call it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown SPARO backend {name!r}; choose one of {BACKENDS}")
    return name


def resolve(name: str, device: torch.device) -> str:
    """Concrete backend for a call: ``auto`` takes triton on CUDA tensors, torch otherwise."""
    check_backend(name)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    return name


def get(name: str) -> Callable:
    """The backend function ``fn(x, eos_indices, params: ReadoutParams, need_weights)``."""
    if check_backend(name) == "reference":
        return sparo_reference
    if name == "torch":
        return sparo_absorbed
    if name == "triton":
        return triton_backend.sparo_triton
    raise ValueError("backend 'auto' must be resolved for a device first (backends.resolve)")
