"""Where the run's checkpoints go and where a resumed run starts: the sharded folders (exact mid-epoch resume,
``checkpoint.py``), OpenCLIP's ``epoch_N.pt`` (``openclip_ckpt.py``) and the exported state dict, and the
choice of what ``--resume`` continues from (the newest usable sharded checkpoint, with a fallback past a
corrupt one; a given folder; or an OpenCLIP ``.pt`` file)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint as ckpt
from . import openclip_ckpt
from .errors import Fatal

log = logging.getLogger("sparo_fast_training")


@dataclass
class Readers:
    """Where each loader worker of this rank stands in its epoch's stream (all counts per logical worker)."""
    positions: List[int]
    skipped: List[int]        # corrupt samples skipped
    shard_errors: List[int]   # shard read errors (each cut a shard short)

    @classmethod
    def fresh(cls, nw: int) -> "Readers":
        return cls([0] * nw, [0] * nw, [0] * nw)

    def update(self, info: List[int]) -> None:
        w, pos, skipped, errors = info
        self.positions[w], self.skipped[w], self.shard_errors[w] = pos, skipped, errors


@dataclass
class Position:
    """Where the run stands: optimizer steps, epochs, steps into the epoch, readers and the counts of epochs done."""
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    readers: Optional[Readers] = None
    skipped_before: int = 0
    shard_errors_before: int = 0
    rng: Optional[Dict[str, Any]] = field(default=None, repr=False)


class CheckpointManager:
    def __init__(self, args, info, ckpt_dir: str, run_name: str):
        self.args, self.info, self.dir, self.run_name = args, info, ckpt_dir, run_name
        self.last_saved = -1

    # -------------------------------------------------------------- writing
    def train_state(self, pos: Position, nw: int) -> Dict[str, Any]:
        a, r = self.args, pos.readers
        return {"step": pos.step, "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch,
                "positions": list(r.positions), "skipped": list(r.skipped), "shard_errors": list(r.shard_errors),
                "skipped_before": pos.skipped_before, "shard_errors_before": pos.shard_errors_before,
                "rng": ckpt.rng_state(), "workers": nw, "batch_size": a.batch_size, "accum_freq": a.accum_freq,
                "seed": a.seed}

    def save(self, model, optimizer, pos: Position, nw: int) -> str:
        keep = 1 if self.args.delete_previous_checkpoint else self.args.keep_checkpoints
        path = ckpt.save(self.dir, pos.step, model, optimizer, self.train_state(pos, nw), keep=keep)
        self.last_saved = pos.step
        log.info(f"saved checkpoint {path}")
        return path

    def save_epoch(self, model, optimizer, scaler, pos: Position, filename: Optional[str] = None) -> str:
        """OpenCLIP's ``epoch_N.pt`` (``open_clip_train --resume`` continues from it), plus the step and the
        model config; ``--delete-previous-checkpoint`` removes ``epoch_{N-1}.pt`` as OpenCLIP does."""
        path = os.path.join(self.dir, filename or f"epoch_{pos.epoch}.pt")
        openclip_ckpt.save(path, model, optimizer, pos.epoch, self.run_name, scaler,
                           {"step": pos.step, "model": self.args.model,
                            "model_config": getattr(model, "config", None)})
        if filename is None and self.args.delete_previous_checkpoint and self.info.is_main:
            prev = os.path.join(self.dir, f"epoch_{pos.epoch - 1}.pt")
            if os.path.isfile(prev):
                os.remove(prev)
        log.info(f"saved {path}")
        return path

    def export(self, filename: str, model, pos: Position) -> str:
        path = os.path.join(self.dir, filename)
        ckpt.export(path, model, {"epoch": pos.epoch, "step": pos.step, "name": self.run_name,
                                  "model": self.args.model, "model_config": getattr(model, "config", None)})
        log.info(f"exported {path}")
        return path

    # -------------------------------------------------------------- resuming
    def resume_source(self) -> Optional[str]:
        a = self.args
        if a.resume == "latest":
            path = None
            if self.info.is_main:
                path = ckpt.latest_usable(self.dir, log.warning)
                if path is None and ckpt.list_checkpoints(self.dir):
                    path = "!unusable"
            from . import distributed as D

            path = D.broadcast_object(path)
            if path == "!unusable":
                raise Fatal(f"--resume latest: no usable checkpoint in {self.dir} (every one is corrupt; "
                            f"warnings above)")
            if path is None:
                log.info(f"--resume latest: no complete checkpoint in {self.dir}; starting from scratch")
            return path
        if not a.resume:
            return None
        if os.path.isfile(a.resume):
            return a.resume
        if not os.path.isfile(os.path.join(a.resume, "train_state.pt")):
            raise Fatal(f"--resume {a.resume}: neither an OpenCLIP .pt file nor a complete checkpoint folder "
                        f"(no train_state.pt)")
        why = ckpt.problem(a.resume)
        if why:
            raise Fatal(f"--resume {a.resume}: unusable checkpoint ({why})")
        return a.resume

    def resume(self, model, optimizer, scaler, nw: int, steps_per_epoch: int) -> Optional[Position]:
        """Collective: load what ``--resume`` names; the run's position, or None for a fresh start."""
        path = self.resume_source()
        if path is None:
            return None
        if os.path.isfile(path):
            return self._resume_openclip(path, model, optimizer, scaler, steps_per_epoch)
        blob = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        r0 = blob["ranks"][0]
        same_layout = self._check_layout(path, blob, r0, nw)
        ckpt.load(path, model, optimizer)
        pos = Position(r0["step"], r0["epoch"], r0["step_in_epoch"])
        if same_layout:
            mine = blob["ranks"][self.info.rank]
            pos.readers = Readers(mine["positions"], mine["skipped"], mine.get("shard_errors", [0] * nw))
            pos.skipped_before = mine["skipped_before"]
            pos.shard_errors_before = mine.get("shard_errors_before", 0)
            ckpt.set_rng_state(mine["rng"])
        log.info(f"resumed from {path}: step {pos.step}, epoch {pos.epoch}, step {pos.step_in_epoch} of the epoch")
        return pos

    def _check_layout(self, path, blob, r0, nw) -> bool:
        a, info = self.args, self.info
        same = (blob["world_size"] == info.world_size and r0["workers"] == nw
                and r0["batch_size"] == a.batch_size and r0["accum_freq"] == a.accum_freq)
        if r0["step_in_epoch"] != 0 and not same:
            raise Fatal(f"cannot resume {path} mid-epoch with a different layout: it was written by "
                        f"{blob['world_size']} rank(s) x {r0['workers']} worker(s), batch {r0['batch_size']} x "
                        f"{r0['accum_freq']} accum; now {info.world_size} x {nw}, batch {a.batch_size} x "
                        f"{a.accum_freq} (resume at an epoch boundary, or with the same layout)")
        if r0["step_in_epoch"] != 0 and r0.get("seed", a.seed) != a.seed:
            raise Fatal(f"cannot resume {path} mid-epoch with --seed {a.seed}: it was written with "
                        f"--seed {r0['seed']} (the data order depends on it)")
        return same

    def _resume_openclip(self, path, model, optimizer, scaler, steps_per_epoch) -> Position:
        try:
            epoch = openclip_ckpt.load(openclip_ckpt.read(path), model, optimizer, scaler)
        except openclip_ckpt.FormatError as e:
            raise Fatal(str(e)) from None
        pos = Position(step=epoch * steps_per_epoch, epoch=epoch)
        log.info(f"resumed from OpenCLIP checkpoint {path}: epoch {epoch}, step {pos.step} (at an epoch boundary)")
        return pos
