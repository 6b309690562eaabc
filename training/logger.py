"""Console progress (rank 0), a log file per run, metrics as JSON lines, TensorBoard / wandb on request."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

NAME = "sparo_fast_training"
_FMT = "%(asctime)s [rank{rank}] %(levelname)s %(message)s"


class ReportError(RuntimeError):
    """A --report-to target that cannot be used (one line)."""


class _Buffer(logging.Handler):
    """Keeps the records logged before the run folder exists, for the log file opened later."""

    def __init__(self):
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def setup(rank: int, debug: bool = False, local_rank: Optional[int] = None) -> logging.Logger:
    """Console logging. Rank 0 (and, with --log-local, each node's local rank 0) logs progress; every
    rank reports warnings (e.g. a skipped corrupt sample)."""
    log = logging.getLogger(NAME)
    log.handlers.clear()
    log.propagate = False
    talks = rank == 0 or local_rank == 0
    log.setLevel(logging.DEBUG if debug else logging.INFO if talks else logging.WARNING)
    fmt = logging.Formatter(_FMT.format(rank=rank), "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    buf = _Buffer()
    buf.setFormatter(fmt)
    log.addHandler(buf)
    return log


def add_file(path: str) -> None:
    """Start the run's log file (the folder exists now) with the lines logged so far."""
    log = logging.getLogger(NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = next((h for h in log.handlers if isinstance(h, _Buffer)), None)
    fh = logging.FileHandler(path)
    fh.setFormatter(buf.formatter if buf else logging.Formatter(_FMT.format(rank="?")))
    for rec in buf.records if buf else []:
        fh.emit(rec)
    if buf:
        log.removeHandler(buf)
    log.addHandler(fh)


def _online(host: str = "api.wandb.ai", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_report_to(report_to: str) -> None:
    """Raise ReportError (one line) for a --report-to target that is not installed, before anything is written."""
    targets = set(filter(None, report_to.split(",")))
    if targets & {"tensorboard", "all"}:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ReportError("--report-to tensorboard: tensorboard is not installed (pip install "
                              "'sparo-fast[train]')") from None
    if targets & {"wandb", "all"}:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ReportError("--report-to wandb: wandb is not installed (pip install wandb)") from None


class MetricsWriter:
    """Rank 0 only: appends ``{"kind": ..., "step": ..., ...}`` lines to ``metrics.jsonl``; with
    ``--report-to`` also TensorBoard (``<run>/tensorboard``) and/or wandb (offline without a network)."""

    def __init__(self, run_dir: Optional[str], enabled: bool, report_to: str = "", args=None):
        self.enabled = enabled and run_dir is not None
        self.path = os.path.join(run_dir, "metrics.jsonl") if self.enabled else None
        self.tb = self.wandb = None
        check_report_to(report_to)
        targets = set(filter(None, report_to.split(",")))
        if "all" in targets:
            targets = {"tensorboard", "wandb"}
        if "tensorboard" in targets and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if "wandb" in targets and self.enabled:
            import wandb

            if "WANDB_MODE" not in os.environ and not _online():
                os.environ["WANDB_MODE"] = "offline"
            config = {k: str(v) for k, v in vars(args).items()} if args is not None else {}
            self.wandb = wandb.init(project=getattr(args, "wandb_project_name", "open-clip"),
                                    name=getattr(args, "name", None), notes=getattr(args, "wandb_notes", ""),
                                    dir=run_dir, config=config)

    def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
