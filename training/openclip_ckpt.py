"""OpenCLIP's single-file training checkpoint (``open_clip_train.main``: ``{"epoch", "name", "state_dict",
"optimizer"[, "scaler"]}``), both ways, for a model sharded with FSDP2 or not.

OpenCLIP's optimizer state is ``torch.optim.Optimizer.state_dict()`` of an AdamW over two parameter groups
built by the rule of ``open_clip_train.main`` (no weight decay for parameters with < 2 dimensions or named
bn/ln/bias/logit_scale, then the others; each in ``model.named_parameters()`` order), indexed by position.
``optim.create_optimizer`` builds its groups by the same rule, so position ``i`` of OpenCLIP's layout is the
``i``-th parameter of our groups; the conversion maps positions to parameter names and lets
``torch.distributed.checkpoint.state_dict`` gather (export) or shard (import) the state for FSDP2.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from . import checkpoint as ckpt
from .optim import no_weight_decay

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class FormatError(ValueError):
    """A file that is not an OpenCLIP training checkpoint of this model (one line)."""


def param_order(model: nn.Module) -> List[str]:
    """Parameter names in OpenCLIP's optimizer index order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in named if no_weight_decay(n, p)] + [n for n, p in named if not no_weight_decay(n, p)]


def _scalars(model: nn.Module) -> set:
    return set(getattr(model, "_sparo_scalar_params", []))


def optimizer_to_openclip(model: nn.Module, optimizer) -> Dict[str, Any]:
    """Collective: the full optimizer state, indexed as OpenCLIP's (0-D logit scale state restored); empty on
    ranks other than 0."""
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not osd:  # cpu_offload gathers the full state on rank 0 only
        return {}
    index = {n: i for i, n in enumerate(param_order(model))}
    scalars = _scalars(model)
    state = {}
    for name, st in osd["state"].items():
        state[index[name]] = {k: (v.reshape(()) if name in scalars and k != "step" and torch.is_tensor(v)
                                  and v.numel() == 1 else v) for k, v in st.items()}
    # OpenCLIP's two groups (no decay, decay), each with the settings of our group holding its first parameter
    ours = {n: g for g in osd["param_groups"] for n in g["params"]}
    order = param_order(model)
    n0 = sum(1 for n, p in model.named_parameters() if p.requires_grad and no_weight_decay(n, p))
    groups = []
    for idx in (list(range(n0)), list(range(n0, len(order)))):
        if idx:
            groups.append({**{k: v for k, v in ours[order[idx[0]]].items() if k != "params"}, "params": idx})
    return {"state": state, "param_groups": groups}


def save(path: str, model: nn.Module, optimizer, epoch: int, name: str, scaler=None,
         extra: Optional[Dict[str, Any]] = None) -> str:
    """Collective: write ``path`` (atomically, rank 0) in OpenCLIP's layout, plus ``extra`` keys."""
    optim_sd = optimizer_to_openclip(model, optimizer) if optimizer is not None else None
    sd = ckpt.full_state_dict(model)
    if dist.get_rank() == 0:
        blob: Dict[str, Any] = {"epoch": epoch, "name": name, "state_dict": sd}
        if optim_sd is not None:
            blob["optimizer"] = optim_sd
        if scaler is not None:
            blob["scaler"] = scaler.state_dict()
        blob.update(extra or {})
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(blob, tmp)
        os.replace(tmp, path)
        ckpt._fsync_dir(os.path.dirname(os.path.abspath(path)))
    dist.barrier()
    return path


def read(path: str) -> Dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise FormatError(f"--resume {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if not isinstance(blob, dict) or "state_dict" not in blob or "epoch" not in blob:
        raise FormatError(f"--resume {path}: not an OpenCLIP training checkpoint (needs 'epoch' and 'state_dict'; "
                          f"a bare state dict is --pretrained)")
    return blob


def load(blob: Dict[str, Any], model: nn.Module, optimizer, scaler=None, what: str = "--resume") -> int:
    """Collective: load an OpenCLIP checkpoint (read on every rank) into the (sharded) model and optimizer.
    Returns its epoch."""
    scalars = _scalars(model)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in blob["state_dict"].items()}
    sd = {k: (v.reshape(1) if k in scalars and v.dim() == 0 else v) for k, v in sd.items()}
    try:
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise FormatError(f"{what}: its state_dict does not fit the model: {str(e).splitlines()[0][:300]}")
    if optimizer is not None and "optimizer" in blob:
        set_optimizer_state_dict(model, optimizer, _optimizer_from_openclip(model, optimizer, blob["optimizer"], what),
                                 options=StateDictOptions(full_state_dict=True))
    if scaler is not None and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    return int(blob["epoch"])


def _optimizer_from_openclip(model: nn.Module, optimizer, osd: Dict[str, Any], what: str) -> Dict[str, Any]:
    order = param_order(model)
    theirs = [i for g in osd["param_groups"] for i in g["params"]]
    if sorted(theirs) != list(range(len(order))):
        raise FormatError(f"{what}: its optimizer holds {len(theirs)} parameters, the model trains {len(order)}")
    params = dict(model.named_parameters())
    state = {}
    for i, st in osd["state"].items():
        name = order[int(i)]
        shape = params[name].shape
        state[name] = {k: (v.reshape(shape) if torch.is_tensor(v) and k != "step" and v.numel() == shape.numel()
                           else v) for k, v in st.items()}
    # our groups, each with the settings of OpenCLIP's group holding its first parameter
    theirs_of = {order[i]: g for g in osd["param_groups"] for i in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in theirs_of[names[id(g["params"][0])]].items() if k != "params"},
               "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups if g["params"]]
    return {"state": state, "param_groups": groups}
