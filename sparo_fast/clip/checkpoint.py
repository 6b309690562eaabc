"""Loading published sparo-clip / OpenCLIP trainer checkpoints and plain state dicts."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, Mapping, Union

import torch
from open_clip.model import resize_pos_embed
from torch import nn

from ..readout import SparoReadout

_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


def read_state_dict(path: Union[str, os.PathLike], *, weights_only: bool = True) -> Dict[str, torch.Tensor]:
    """The state dict in ``path``: a trainer checkpoint ``{"state_dict": ...}`` or a plain state
    dict, with any ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) prefix removed.

    ``weights_only=True`` (default) refuses pickled Python objects other than tensors and
    containers; pass False only for files you trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise CheckpointError(f"checkpoint {path!r} is not a PyTorch checkpoint (neither a torch.save zip "
                              "archive nor a pickle)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path!r} holds pickled objects that weights_only loading refuses "
                              "(only tensors and plain containers are allowed); if you trust the file, "
                              "load it with weights_only=False") from e
    except Exception as e:  # truncated files, not a torch file at all, ...
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch file: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    return extract_state_dict(ckpt, source=path)


def extract_state_dict(ckpt: Any, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        sd = ckpt["state_dict"]
    else:
        sd = ckpt
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"{source} holds no state dict (expected a dict of tensors or "
                              "{'state_dict': {...}})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: the state dict has non-tensor entries, e.g. {bad[:3]}")
    out = dict(sd)
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in out):
                out = {k[len(p):]: v for k, v in out.items()}
                changed = True
    return out


def _shared_kv_conflicts(model: nn.Module, sd: Mapping[str, torch.Tensor]):
    """Names of SPARO read-outs that share k/v in the model but hold different k and v weights in sd."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, SparoReadout) and m.share_kv:
            pre = f"{name}." if name else ""
            for p in ("weight", "bias"):
                k, v = sd.get(f"{pre}k.{p}"), sd.get(f"{pre}v.{p}")
                if k is not None and v is not None and (k.shape != v.shape or not torch.equal(k, v)):
                    out.append(name)
                    break
    return out


def _resizable(key: str, theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """The image position embedding of another grid size (resized on load, as OpenCLIP does)."""
    return (key == "visual.positional_embedding" and theirs.dim() == ours.dim() == 2
            and theirs.shape[1] == ours.shape[1])


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool = True,
                     source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape and not _resizable(k, sd[k], own[k])]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    conflicts = _shared_kv_conflicts(model, sd)
    if conflicts:
        problems.append(f"read-out(s) {conflicts} share key/value weights (share_kv=True) but the checkpoint "
                        "holds different k and v weights: build the model with share_kv=False")
    if problems:
        hint = ""
        if any(k.startswith(("visual.sparo.", "text_sparo.")) for k in missing) and not any(
                k.startswith(("visual.sparo.", "text_sparo.")) for k in sd):
            hint = " (the checkpoint has no SPARO read-out: is it a baseline CLIP checkpoint?)"
        elif any(k in ("visual.proj", "text_projection") for k in unexpected):
            hint = " (the checkpoint has CLIP projections: is it a baseline CLIP checkpoint?)"
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems) + hint)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike, Mapping[str, Any]], strict: bool = True, *,
                    weights_only: bool = True):
    """Load a published trainer checkpoint (``{"state_dict": ...}``, with or without ``module.``)
    or a plain state dict (a path, or the dict itself) into ``model``.

    The image position embedding is resized like OpenCLIP does when the grid differs. Raises
    ``CheckpointError`` (a ``ValueError``) for unreadable files and, with ``strict``, for any
    missing/unexpected key; shape mismatches always raise. Returns ``model.load_state_dict``'s
    ``(missing_keys, unexpected_keys)``.
    """
    if isinstance(path, Mapping):
        sd, source = extract_state_dict(path, source="state dict"), "state dict"
    else:
        sd, source = read_state_dict(path, weights_only=weights_only), repr(os.fspath(path))
    check_state_dict(model, sd, strict=strict, source=source)
    if hasattr(getattr(model, "visual", None), "grid_size"):
        try:
            resize_pos_embed(sd, model)
        except Exception as e:
            raise CheckpointError(f"{source}: cannot resize visual.positional_embedding "
                                  f"{tuple(sd['visual.positional_embedding'].shape)} to the model's grid: {e}") from e
    return model.load_state_dict(sd, strict=strict)
