"""Sharded, atomic, exactly-resumable checkpoints (torch.distributed.checkpoint) and the single-file export.

Layout under ``<logs>/<name>/checkpoints``::

    step_00000120/           a complete checkpoint (DCP shards + .metadata + train_state.pt)
    step_00000180.tmp/       being written (or left by a crash): never read, removed by the next save

A checkpoint is written into ``*.tmp`` by all ranks, then renamed by rank 0 once every rank has
finished, so resume only ever sees complete ones. ``train_state.pt`` holds step, epoch, the data
position of every rank and loader worker, and the RNG state of every rank.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from . import distributed as D

STEP_RE = re.compile(r"^step_(\d+)$")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed here (reported as one line)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def list_checkpoints(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    found = []
    for d in os.listdir(root):
        m = STEP_RE.match(d)
        path = os.path.join(root, d)
        complete = all(os.path.isfile(os.path.join(path, f)) for f in ("train_state.pt", ".metadata"))
        if m and complete:
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest(root: str) -> Optional[str]:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def problem(path: str) -> Optional[str]:
    """Why the sharded checkpoint folder ``path`` cannot be resumed (truncated or missing files, an
    unreadable train_state.pt or .metadata), or None. Reads headers and sizes only, never the tensors."""
    try:
        blob = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        if not isinstance(blob, dict) or "ranks" not in blob:
            return "train_state.pt has no per-rank state"
        meta = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # any unreadable file is the same verdict: not this one
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    need: Dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = os.path.join(path, rel)
        have = os.path.getsize(f) if os.path.isfile(f) else -1
        if have < size:
            return f"{rel} is {'missing' if have < 0 else f'truncated ({have} of {size} bytes)'}"
    return None


def latest_usable(root: str, warn) -> Optional[str]:
    """The newest complete checkpoint that passes ``problem``; each one passed over is warned about, naming
    the one used instead."""
    ckpts = list_checkpoints(root)
    bad = []
    for path in reversed(ckpts):
        why = problem(path)
        if why is None:
            for b, w in bad:
                warn(f"checkpoint {b} is unusable ({w}); resuming from the previous complete one, {path}")
            return path
        bad.append((path, why))
    for b, w in bad:
        warn(f"checkpoint {b} is unusable ({w}); no earlier complete checkpoint")
    return None


def save(root: str, step: int, model: nn.Module, optimizer, train_state: Dict[str, Any],
         keep: int = 2, protect: Optional[List[str]] = None) -> str:
    """Collective: every rank calls it. ``train_state`` is this rank's entry; all are gathered."""
    rank = dist.get_rank()
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):
            if d.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    states = D.all_gather_object(train_state)
    if rank == 0:
        blob = {"step": train_state["step"], "epoch": train_state["epoch"], "world_size": dist.get_world_size(),
                "ranks": states}
        torch.save(blob, os.path.join(tmp, "train_state.pt"))
        if os.path.exists(final):
            shutil.rmtree(final)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(root)
        ckpts = list_checkpoints(root)
        keep_set = set(protect or [])
        for old in ckpts[:-keep] if keep > 0 else []:
            if old not in keep_set:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: str, model: nn.Module, optimizer) -> Dict[str, Any]:
    """Collective: restore model and optimizer (resharded to this world size) and return train_state.pt."""
    blob = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return blob


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Collective: the unsharded float32 state dict on rank 0 (empty elsewhere), published key layout."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in getattr(model, "_sparo_scalar_params", []):
        if name in sd:
            sd[name] = sd[name].reshape(())
    return sd


def export(path: str, model: nn.Module, extra: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Collective: write ``{"state_dict": ...}`` (plus ``extra``) to ``path`` atomically from rank 0."""
    sd = full_state_dict(model)
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"state_dict": sd, **(extra or {})}, tmp)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    dist.barrier()
    return path
