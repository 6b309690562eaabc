"""FSDP2 wrapping: ``fully_shard`` on every residual block of both towers and on the root."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


class Precision(NamedTuple):
    """How one OpenCLIP ``--precision`` name runs under FSDP2."""
    weights: torch.dtype                  # dtype of the sharded (master) parameters the optimizer updates
    param_dtype: Optional[torch.dtype]    # MixedPrecisionPolicy.param_dtype: all-gathered compute weights
    reduce_dtype: Optional[torch.dtype]   # MixedPrecisionPolicy.reduce_dtype: gradient reduce-scatter
    autocast: Optional[torch.dtype]       # torch.autocast around forward and loss (None: off)
    note: str


_BF, _F16, _F32 = torch.bfloat16, torch.float16, torch.float32
# OpenCLIP's --precision names -> FSDP2. fp16/pure_fp16 are refused in params (fp16 weights, no scaler).
PRECISIONS: Dict[str, Precision] = {
    "fp32": Precision(_F32, None, _F32, None, "fp32 everywhere (TF32 matmuls on CUDA, as OpenCLIP sets them)"),
    "amp": Precision(_F32, None, _F32, _F16, "OpenCLIP's default: fp16 autocast over fp32 weights (all-gathered "
                     "in fp32, cast per op by autocast), fp32 gradient reduction, a torch.amp.GradScaler"),
    "amp_bf16": Precision(_F32, _BF, _F32, _BF, "OpenCLIP's bf16 autocast: fp32 master weights, bf16 matmuls "
                          "(weights all-gathered in bf16), autocast's fp32 ops (norms, softmax, loss) in fp32, "
                          "fp32 gradient reduction"),
    "amp_bfloat16": Precision(_F32, _BF, _F32, _BF, "same as amp_bf16"),
    "bf16": Precision(_F32, _BF, _F32, None, "every op in bf16 with fp32 master weights and fp32 gradient "
                      "reduction (OpenCLIP's bf16 keeps no fp32 master copy; this keeps one)"),
    "pure_bf16": Precision(_BF, _BF, _BF, None, "OpenCLIP's pure_bf16: the whole model (and the optimizer "
                           "state) in bf16, bf16 gradient reduction (param_dtype bf16 makes FSDP2 cast the "
                           "image input, as OpenCLIP's input dtype does)"),
}


def make_scalars_1d(model: nn.Module) -> List[str]:
    """FSDP2 shards dim 0 and refuses 0-D parameters: turn each (``logit_scale``, ``logit_bias``) into
    shape [1] in place. Arithmetic broadcasts the same; ``export`` restores the 0-D shape. Returns the
    names changed (recorded on ``model._sparo_scalar_params``)."""
    changed = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            setattr(mod, attr, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
            changed.append(name)
    model._sparo_scalar_params = changed
    return changed


def residual_blocks(model: nn.Module) -> List[nn.Module]:
    blocks: List[nn.Module] = []
    for tower in (getattr(model, "visual", None), model):
        tr = getattr(tower, "transformer", None)
        if tr is not None and hasattr(tr, "resblocks"):
            blocks.extend(tr.resblocks)
    return blocks


SCALARS = ("logit_scale", "logit_bias")


def scalar_params(model: nn.Module) -> List[nn.Parameter]:
    """The logit scale (and bias): kept in fp32 and out of FSDP2's casts under every precision (a bf16
    round trip turns exp(ln(1/0.07)) = 14.2857 into 14.25)."""
    return [p for n, p in model.named_parameters() if n.rpartition(".")[2] in SCALARS]


def make_mesh(device: torch.device, world_size: int, replicate: int = 1):
    """1-D mesh (FSDP) or, with ``replicate`` > 1, the 2-D mesh (replicate, shard) of HSDP: parameters are
    sharded within each group of ``world_size / replicate`` ranks (a node) and replicated across groups."""
    if replicate <= 1:
        return init_device_mesh(device.type, (world_size,))
    if world_size % replicate:
        raise ValueError(f"--fsdp-replicate {replicate} does not divide the {world_size} ranks")
    return init_device_mesh(device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, device: torch.device, world_size: int, precision: str,
                grad_checkpointing: bool = False, replicate: int = 1) -> nn.Module:
    """Apply FSDP2 (in place) with the policy of ``PRECISIONS[precision]`` (HSDP with ``replicate`` > 1).
    The logit scale and bias stay plain fp32 parameters replicated on every rank (``ignored_params``; the
    training step averages their gradients: ``model._sparo_replicated``)."""
    make_scalars_1d(model)
    model._sparo_replicated = []
    if grad_checkpointing:
        # OpenCLIP's towers wrap each block call in torch.utils.checkpoint (non-reentrant): only the
        # block inputs are kept and FSDP2 re-gathers the block's weights for the recomputation.
        model.set_grad_checkpointing(True)
    pr = PRECISIONS[precision]
    if world_size == 1 and pr.weights == torch.float32 and pr.param_dtype in (None, torch.float32):
        # One fp32 process has nothing to shard or cast: FSDP2 would only add copies, hooks and
        # DTensor dispatch (+5-12% CPU per step, bench/trainer/NOTES.md). DCP still saves
        # and loads the plain module, so its checkpoints reshard onto any world size.
        return model
    mesh = make_mesh(device, world_size, replicate)
    keep = scalar_params(model)
    if pr.weights != torch.float32:
        exact = [p.detach().clone() for p in keep]
        model.to(pr.weights)
        for p, value in zip(keep, exact):
            p.data = value
    mp = MixedPrecisionPolicy(param_dtype=pr.param_dtype, reduce_dtype=pr.reduce_dtype)
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError("no residual blocks found at visual.transformer.resblocks / transformer.resblocks")
    for blk in blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=set(keep))
    model._sparo_replicated = keep
    for method in ("encode_image", "encode_text"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model

