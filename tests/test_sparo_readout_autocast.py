"""Autocast with fp32 weights: the shared k/v weight is cast once and stays shared.

Counted, not timed: the aten ops one forward+backward step of a tiny module dispatches, under
``torch.autocast`` (bfloat16 on the CPU) with float32 parameters and ``share_kv=True``.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparo_fast import SparoReadout


class _Count(TorchDispatchMode):
    """Counts aten ops, and the dtype casts (``_to_copy``) that read a given tensor's storage."""

    def __init__(self, watch: torch.Tensor):
        super().__init__()
        self.ops = Counter()
        self.watch = watch.untyped_storage().data_ptr()
        self.casts_of_watch = 0
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name == "aten._to_copy":
            self.casts += 1
            if args[0].untyped_storage().data_ptr() == self.watch:
                self.casts_of_watch += 1
        return func(*args, **(kwargs or {}))


def _step(m, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attn = m(x)
    (out.float().square().sum() + attn.float().sum()).backward()


def _counted_step(share_kv: bool) -> _Count:
    torch.manual_seed(0)
    print("seed 0")
    dim, L, V, A = 8, 4, 3, 4
    m = SparoReadout(dim, L, V, A, share_kv=share_kv, backend="torch")
    x = torch.randn(2, 5, dim)
    _step(m, x)  # warm-up (lazy initialisation)
    m.zero_grad()
    with _Count(m.k.weight) as c:
        _step(m, x)
    assert m.k.weight.grad.dtype == torch.float32 and torch.isfinite(m.k.weight.grad).all()
    print(f"aten ops per step ({'shared' if share_kv else 'separate'} k/v): {sum(c.ops.values())}, "
          f"casts {c.casts}")
    return c


@pytest.mark.parametrize("share_kv", [True, False], ids=["shared", "separate"])
def test_shared_weight_cast_once(share_kv):
    c = _counted_step(share_kv)
    # the k weight is read by exactly one bf16 cast per step, shared with v or not
    assert c.casts_of_watch == 1, c.casts_of_watch


def test_shared_saves_a_cast_each_way():
    """share_kv: one bf16 copy of the k/v weight and one of the bias, and one gradient each back:
    four casts fewer per step than with separate k and v."""
    shared, separate = _counted_step(True), _counted_step(False)
    assert separate.casts - shared.casts == 4, (separate.casts, shared.casts)
