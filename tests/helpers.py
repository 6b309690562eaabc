"""Shared test utilities: golden-file loading and a module with the published layout (error
metrics live in ``accuracy.py``)."""
from pathlib import Path

import torch
from torch import nn

from sparo_fast.functional import sparo_reference
from sparo_fast.params import ReadoutParams

DATA = Path(__file__).parent / "data"
GOLDEN_READOUTS = ("readout_vision_shared_kv", "readout_text_subheads_separate_kv")


def load_golden(name):
    return torch.load(DATA / f"{name}.pt", weights_only=False)


def golden_loss_and_grads(module, golden, dtype=torch.float64):
    """Run the golden case through ``module``: outputs and the grads of sum(out*g)+sum(attn*ga)."""
    x = golden["x"].to(dtype).clone().requires_grad_()
    eos = golden["eos_indices"]
    out, attn = module(x, eos)
    loss = (out * golden["grad_out"].to(dtype)).sum() + (attn * golden["grad_attn"].to(dtype)).sum()
    loss.backward()
    grads = {"x": x.grad}
    for name, p in module.named_parameters():  # shared k/v weights appear once, under k.*
        grads[name] = p.grad
    return out, attn, grads


class PublishedLayoutSparo(nn.Module):
    """A module with the published SPARO attributes and parameters (docs/DESIGN.md, "Parameters and the published state-dict layout").

    It stands in for the published class in round-trip and ``convert`` tests: what matters is
    its attribute/parameter layout and the published math, which ``sparo_reference`` computes.
    """

    def __init__(self, dim, L, V, attn_dim, value_dim=None, num_heads=None, share_kv=True):
        super().__init__()
        self.L, self.attn_dim = L, attn_dim
        self.value_dim = attn_dim if value_dim is None else value_dim
        self.num_heads = L if num_heads is None else num_heads
        self.num_subheads = L // self.num_heads
        self.share_kv = share_kv
        self.scale = attn_dim**-0.5
        self.q_emb = nn.Parameter(torch.randn(1, self.num_heads, self.num_subheads, 1, attn_dim))
        self.k = nn.Linear(dim, self.num_heads * attn_dim)
        nn.init.xavier_uniform_(self.k.weight)
        nn.init.zeros_(self.k.bias)
        if share_kv:
            self.v = self.k
        else:
            self.v = nn.Linear(dim, self.num_heads * self.value_dim)
            nn.init.xavier_uniform_(self.v.weight)
            nn.init.zeros_(self.v.bias)
        self.proj = nn.Linear(self.value_dim, V)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, eos_indices=None):
        return sparo_reference(x, eos_indices, ReadoutParams(self.q_emb, self.k.weight, self.k.bias, self.v.weight,
                                                             self.v.bias, self.proj.weight, self.proj.bias))
