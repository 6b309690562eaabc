"""Console progress (rank 0), a log file per run, metrics as JSON lines, TensorBoard when installed."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional

NAME = "sparo_fast_training"


def setup(rank: int, log_file: Optional[str] = None) -> logging.Logger:
    log = logging.getLogger(NAME)
    log.handlers.clear()
    log.propagate = False
    # every rank reports warnings (e.g. a skipped corrupt sample); only rank 0 reports progress
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if log_file and rank == 0:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


class MetricsWriter:
    """Rank 0 only: appends ``{"kind": ..., "step": ..., ...}`` lines to ``metrics.jsonl``."""

    def __init__(self, run_dir: Optional[str], enabled: bool):
        self.enabled = enabled and run_dir is not None
        self.path = os.path.join(run_dir, "metrics.jsonl") if self.enabled else None
        self.tb = None
        if self.enabled:
            os.makedirs(run_dir, exist_ok=True)
            try:  # optional
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception:
                self.tb = None

    def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
