"""``--pretrained``: a local torch file, a ``.safetensors`` file, or ``hf-hub:ORG/NAME`` resolved by OpenCLIP's
own ``download_pretrained_from_hf`` (safetensors first, as OpenCLIP does). With ``HF_HUB_OFFLINE=1`` the
Hugging Face hub client answers from its local cache only (``--cache-dir`` or ``HF_HOME``), so nothing is
downloaded; a name missing from the cache is one line."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

HF_PREFIX = "hf-hub:"


class PretrainedError(ValueError):
    """--pretrained cannot be used (one line)."""


def resolve(spec: str, cache_dir: Optional[str] = None) -> str:
    """The local file ``spec`` names."""
    if spec.startswith(HF_PREFIX):
        from open_clip.pretrained import download_pretrained_from_hf

        repo = spec[len(HF_PREFIX):]
        try:
            return download_pretrained_from_hf(repo, cache_dir=cache_dir)
        except Exception as e:
            raise PretrainedError(f"--pretrained {spec}: not in the Hugging Face cache and not downloadable "
                                  f"({str(e).splitlines()[0][:200]})") from None
    if not os.path.isfile(spec):
        raise PretrainedError(f"--pretrained {spec}: not a file (give a local checkpoint, a .safetensors file or "
                              f"hf-hub:ORG/NAME from the local Hugging Face cache)")
    if not os.access(spec, os.R_OK):
        raise PretrainedError(f"--pretrained {spec}: not readable")
    return spec


def read(path: str) -> Dict[str, torch.Tensor]:
    """The state dict in a local file (safetensors or torch)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise PretrainedError(f"--pretrained {path}: not a readable safetensors file "
                                  f"({str(e).splitlines()[0][:200]})") from None
    from sparo_fast.clip import read_state_dict

    try:
        return read_state_dict(path)
    except ValueError as e:
        raise PretrainedError(f"--pretrained: {e}") from None


def load_into(model, spec: str, cache_dir: Optional[str] = None) -> str:
    """Resolve ``spec`` and load it into ``model`` strictly; returns the file used."""
    from sparo_fast.clip import load_checkpoint

    path = resolve(spec, cache_dir)
    try:
        load_checkpoint(model, read(path), strict=True)
    except ValueError as e:
        raise PretrainedError(f"--pretrained {spec}: {str(e).splitlines()[0][:300]}") from None
    return path
