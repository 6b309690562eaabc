"""The progress line and its ``train`` row in metrics.jsonl, over a window of steps since the last line."""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import evaluate as ev

log = logging.getLogger("sparo_fast_training")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def hms(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class Window:
    """The steps since the last progress line: when it started, seconds spent waiting for data, steps."""
    start: float = field(default_factory=time.time)
    data_s: float = 0.0
    steps: int = 0


@dataclass
class Plan:
    """What the ETA and throughput figures are relative to (fixed once training starts)."""
    t_start: float
    first_step: int
    planned_steps: int
    total_steps: int
    global_batch: int
    step_flops: float
    peak: float


class Progress:
    def __init__(self, device, world_size: int, metrics, plan: Plan):
        self.device, self.world_size, self.metrics, self.plan = device, world_size, metrics, plan
        self.window = Window()

    def line(self, model, step: int, epoch: int, loss, gnorm, lr: float, corrupt: int, shard_errors: int) -> None:
        """Collective (the loss and the corrupt counts are summed over the ranks)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        p, w = self.plan, self.window
        now = time.time()
        dt = now - w.start
        t = torch.cat([loss.reshape(1).float().cpu(), torch.tensor([float(corrupt), float(shard_errors)])])
        t = t.to(self.device) if self.device.type != "cpu" else t
        dist.all_reduce(t)  # mean loss over ranks (with --local-loss each holds its rows' loss); total counts
        loss_v, corrupt, shard_errors = t[0].item() / self.world_size, int(t[1].item()), int(t[2].item())
        sps = w.steps * p.global_batch / dt
        achieved = w.steps * p.step_flops / dt / 1e12 if p.step_flops else None  # per rank
        elapsed = now - p.t_start
        done = step - p.first_step
        eta = elapsed / done * (p.planned_steps - step) if done else 0.0
        rec = {"epoch": epoch, "loss": loss_v, "lr": lr, "samples_per_s": sps,
               "data_time_pct": 100.0 * w.data_s / dt, "grad_norm": gnorm.item(),
               "peak_mem_gb": peak_memory_gb(self.device), "tflops_per_rank": achieved,
               "mfu": achieved / p.peak if p.peak and achieved is not None else None,
               "logit_scale": float(ev.logit_scale_value(model)), "corrupt_samples": corrupt,
               "shard_errors": shard_errors, "elapsed_s": elapsed, "eta_s": eta}
        bad = f" | corrupt {corrupt} samples, {shard_errors} shard errors" if corrupt or shard_errors else ""
        log.info(f"epoch {epoch} step {step}/{p.total_steps} "
                 f"({100.0 * step / p.total_steps:.0f}%) elapsed {hms(elapsed)} eta {hms(eta)} | "
                 f"loss {loss_v:.4f} lr {lr:.3g} | {sps:.1f} samples/s | data {rec['data_time_pct']:.0f}% "
                 f"| grad-norm {rec['grad_norm']:.3f} | peak mem {rec['peak_mem_gb']:.2f} GB | "
                 + (f"MFU {100 * rec['mfu']:.1f}% ({achieved:.3f} TFLOP/s/rank) | " if rec["mfu"] is not None else "")
                 + f"scale {rec['logit_scale']:.1f}{bad}")
        self.metrics.write("train", step, rec)
        self.window = Window()
