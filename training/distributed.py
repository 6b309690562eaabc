"""Process group set-up: torchrun (one or several processes, one or several nodes) or a plain run."""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return choice


def init(device_choice: str = "auto", backend: Optional[str] = None) -> DistInfo:
    """Initialise the default process group (NCCL on GPUs, gloo on CPUs) from torchrun's environment.

    Without torchrun (no RANK in the environment) a single-process group is created on a free
    local port, so the same FSDP2 code path runs.
    """
    kind = resolve_device(device_choice)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if kind == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = backend or "nccl"
    else:
        device = torch.device("cpu")
        if backend not in (None, "gloo"):
            raise RuntimeError(f"--dist-backend {backend}: CPU runs use gloo")
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kw)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def cleanup(synchronize: bool = True) -> None:
    """Tear the process group down. After a normal end every rank first meets the others, so that no
    rank destroys its group while a peer still has gloo traffic in flight (seen as an abort at exit
    on loaded CPUs); after an error no barrier, since a failed peer may never arrive."""
    if not dist.is_initialized():
        return
    if synchronize:
        try:
            dist.barrier()
        except Exception:  # a peer already gone: tearing down is all that is left to do
            pass
    dist.destroy_process_group()


def all_gather_object(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    buf = [obj]
    dist.broadcast_object_list(buf, src=src)
    return buf[0]
