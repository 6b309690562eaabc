"""``SparoReadout``: drop-in for the published SPARO module, with selectable backends."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import backends
from . import sparo_readout_triton as triton_backend
from .absorbed_cache import AbsorbedQueryCache, unscaled_absorbed_query
from .params import ReadoutParams
from .validation import check_config, check_input


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in: autocast's when it is on (float64 excepted,
    as autocast leaves float64 alone), else x's own."""
    dev = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class SparoReadout(nn.Module):
    """SPARO read-out: L single-query attention slots over the tokens of an encoder.

    Same constructor, parameter names, shapes, init order (so the same seed gives the same
    weights) and state-dict keys as the published ``SPARO`` module. ``forward(x, eos_indices)``
    returns ``(out [B, L, V], attn [B, L, N])``; ``attn`` is ``None`` when ``need_weights`` is
    off (the constructor's ``need_weights`` is the default; ``forward(..., need_weights=)``
    overrides it per call).

    Backends: ``"reference"`` (published math, keys and values materialised), ``"torch"``
    (absorbed formulation, PyTorch ops), ``"triton"`` (fused kernels) and ``"auto"`` (triton
    on CUDA tensors, torch otherwise).

    Dtypes follow ``nn.Linear``: x must have the parameters' dtype, except under
    ``torch.autocast``, where x and the parameters are cast to the autocast dtype (so the
    bf16 tokens of an autocast tower work with fp32 master weights); outputs (``attn`` too)
    have the compute dtype.

    ``check_inputs`` (default on) validates ``eos_indices`` values, which costs one host sync
    per call with ``eos_indices``; ``check_finite`` (default off, it reads all of x) rejects
    NaN/inf in x. Both are plain attributes and skipped under ``torch.compile``.

    Inference path: in ``eval()`` mode, where autograd records nothing (``no_grad``,
    ``inference_mode``, or no input requiring grad), the triton backend runs one fused kernel
    that saves nothing and reuses the absorbed query cached per weight version
    (``absorbed_cache``, see ``sparo_fast/absorbed_cache.py``); ``cache_absorbed_query = False``
    recomputes it every call.
    """

    def __init__(self, dim: int, L: int, V: int, attn_dim: int, value_dim: Optional[int] = None,
                 num_heads: Optional[int] = None, share_kv: bool = True, *, backend: str = "auto",
                 need_weights: bool = True, device=None, dtype=None):
        super().__init__()
        value_dim = attn_dim if value_dim is None else value_dim
        num_heads = L if num_heads is None else num_heads
        check_config(dim, L, V, attn_dim, value_dim, num_heads, share_kv)
        backends.check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.dim = dim
        self.L = L
        self.V = V
        self.attn_dim = attn_dim
        self.value_dim = value_dim
        self.num_heads = num_heads
        self.num_subheads = L // num_heads
        self.share_kv = share_kv
        self.scale = attn_dim**-0.5
        self.backend = backend
        self.need_weights = need_weights
        self.check_inputs = True
        self.check_finite = False
        self.cache_absorbed_query = True
        self.absorbed_cache = AbsorbedQueryCache()  # not state: rebuilt from the weights on demand

        # Same creation and init calls, in the same order, as the published module.
        self.q_emb = nn.Parameter(torch.randn(1, num_heads, self.num_subheads, 1, attn_dim, **factory))
        self.k = nn.Linear(dim, num_heads * attn_dim, **factory)
        nn.init.xavier_uniform_(self.k.weight)
        nn.init.zeros_(self.k.bias)
        if not share_kv:
            self.v = nn.Linear(dim, num_heads * value_dim, **factory)
            nn.init.xavier_uniform_(self.v.weight)
            nn.init.zeros_(self.v.bias)
        else:
            self.v = self.k  # one module under two names: both key sets appear in the state dict
        self.proj = nn.Linear(value_dim, V, **factory)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, L={self.L}, V={self.V}, attn_dim={self.attn_dim}, "
                f"value_dim={self.value_dim}, num_heads={self.num_heads}, share_kv={self.share_kv}, "
                f"backend={self.backend!r}, need_weights={self.need_weights}")

    def params(self, dtype: Optional[torch.dtype] = None) -> ReadoutParams:
        """The parameters as one ``ReadoutParams`` (what every backend takes), optionally cast."""
        ps = ReadoutParams(self.q_emb, self.k.weight, self.k.bias, self.v.weight, self.v.bias,
                           self.proj.weight, self.proj.bias)
        return ps.cast(dtype)

    def forward(self, x: Tensor, eos_indices: Optional[Tensor] = None,
                need_weights: Optional[bool] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``need_weights`` overrides the module's default for this call only (re-entrant and
        compile-friendly: the attribute is never flipped)."""
        if need_weights is None:
            need_weights = self.need_weights
        compiling = torch.compiler.is_compiling()
        check_input(x, self.dim, eos_indices, check_values=self.check_inputs and not compiling,
                    check_finite=self.check_finite and not compiling)
        dtype = _compute_dtype(x)
        autocast = dtype != x.dtype or torch.is_autocast_enabled(x.device.type)
        if not autocast and x.dtype != self.q_emb.dtype:
            raise TypeError(f"SparoReadout: x is {x.dtype} but the parameters are {self.q_emb.dtype}; "
                            "cast one of them, or run under torch.autocast")
        if x.device != self.q_emb.device:
            raise ValueError(f"SparoReadout: x is on {x.device} but the parameters are on {self.q_emb.device}")
        name = backends.resolve(self.backend, x.device)
        if x.shape[0] == 0:
            name = "torch"  # an empty batch needs no kernel, only correctly shaped outputs
        fn = backends.get(name)
        with torch.autocast(x.device.type, enabled=False):
            params = self.params(dtype)
            if name == "triton" and not self.training and not triton_backend.grad_needed(x, params):
                return triton_backend.sparo_triton_infer(x.to(dtype), eos_indices, params, bool(need_weights),
                                                         self._absorbed_query(params, dtype))
            return fn(x.to(dtype), eos_indices, params, need_weights=bool(need_weights))

    def _absorbed_query(self, params: ReadoutParams, dtype: torch.dtype) -> torch.Tensor:
        """The unscaled absorbed query for the inference path: cached per weight version (keyed on
        the master parameters, cast to ``dtype``), computed afresh while compiling."""
        if torch.compiler.is_compiling() or not self.cache_absorbed_query:
            return unscaled_absorbed_query(params.q_emb, params.k_weight)
        return self.absorbed_cache.get(self.q_emb, self.k.weight, dtype)

    def _apply(self, fn, recurse=True):
        self.absorbed_cache.clear()  # .to() / .cuda() / .half(): new tensors, maybe at reused addresses
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.absorbed_cache.clear()  # also covers load_state_dict(assign=True), which swaps tensors
        return super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def from_published(cls, module: nn.Module, **kwargs) -> "SparoReadout":
        """A ``SparoReadout`` sharing the published module's own parameters (no copy)."""
        q = module.q_emb
        new = cls(module.k.in_features, module.L, module.proj.out_features, module.attn_dim,
                  module.value_dim, module.num_heads, module.share_kv, device="meta", **kwargs)
        new.q_emb = q
        new.k = module.k
        new.v = module.v
        new.proj = module.proj
        new.training = module.training  # an eval() model stays in eval() (and on the inference path)
        return new


def is_published_sparo(module: nn.Module) -> bool:
    """Recognise a published-style SPARO module by its attributes and parameters."""
    if isinstance(module, SparoReadout):
        return False
    q = getattr(module, "q_emb", None)
    lin = [getattr(module, n, None) for n in ("k", "v", "proj")]
    attrs = ("L", "attn_dim", "value_dim", "num_heads", "share_kv")
    return (isinstance(q, nn.Parameter) and q.dim() == 5 and all(isinstance(m, nn.Linear) for m in lin)
            and all(hasattr(module, a) for a in attrs))


def convert(model: nn.Module, **kwargs) -> nn.Module:
    """Return ``model`` with every published-style SPARO module replaced by a ``SparoReadout``.

    Always use the result: ``model = convert(model)``. Submodules are replaced inside
    ``model`` (which is returned); a bare published module cannot replace itself, so a new
    ``SparoReadout`` is returned. Either way the new modules hold the very same parameter
    tensors, so optimizers and state dicts keep working.
    Keyword arguments (``backend``, ``need_weights``) go to ``SparoReadout``.
    """
    if is_published_sparo(model):
        return SparoReadout.from_published(model, **kwargs)
    targets = [(name, m) for name, m in model.named_modules() if is_published_sparo(m)]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, SparoReadout.from_published(m, **kwargs))
    return model
