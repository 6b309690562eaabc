"""The run folder ``<logs>/<name>``: who owns it, whether a run may write into it, and start-up checks that
every folder the run will write is writable (so nothing fails at the first save, hours in).

Rules (OpenCLIP's, plus one of this trainer's):

* a folder this trainer made (its marker file, or the ``params.json`` it always wrote) is an existing
  experiment: refused unless ``--resume`` is given, with OpenCLIP's message;
* a non-empty folder without that mark belongs to another program (an ``open_clip_train`` run writes
  ``params.txt``, ``out.log`` and ``checkpoints/epoch_N.pt``): always refused, so that its checkpoints are
  never overwritten; continue such a run with ``--resume PATH/checkpoints/epoch_N.pt`` under a new name;
* an empty or missing folder is a new run.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

MARKER = ".sparo_fast_training"


def owned(run_dir: str) -> bool:
    """True for a folder this trainer wrote (the marker; or params.json without OpenCLIP's params.txt)."""
    if os.path.isfile(os.path.join(run_dir, MARKER)):
        return True
    return (os.path.isfile(os.path.join(run_dir, "params.json"))
            and not os.path.isfile(os.path.join(run_dir, "params.txt")))


def _looks_like_open_clip(run_dir: str) -> bool:
    ck = os.path.join(run_dir, "checkpoints")
    epoch_pts = os.path.isdir(ck) and any(f.startswith("epoch_") and f.endswith(".pt") for f in os.listdir(ck))
    return os.path.isfile(os.path.join(run_dir, "params.txt")) or epoch_pts


def refusal(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """Why this run may not use ``run_dir`` (one line), or None."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        return f"{run_dir} exists and is not a folder; use --name to specify a new experiment"
    if not os.path.isdir(run_dir) or not os.listdir(run_dir):
        return None
    if not owned(run_dir):
        what = "an open_clip_train run folder" if _looks_like_open_clip(run_dir) else "a folder of another program"
        return (f"{run_dir} is {what} (no {MARKER} marker): refusing to write into it; use --name to specify a new "
                f"experiment (an OpenCLIP checkpoint continues with --resume PATH/epoch_N.pt)")
    if not resume:
        return (f"experiment already exists at {run_dir}. Use --name to specify a new experiment "
                f"(or --resume latest to continue it)")
    return None


def writable_problem(folder: str, what: str) -> Optional[str]:
    """Create ``folder`` if needed and write (then remove) a probe file in it: None when that works."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        return f"{what} {folder}: not writable ({e.strerror or e})"
    return None


def nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def logs_problem(logs: str) -> Optional[str]:
    """--logs must be (or be creatable as) a writable folder; checked without creating anything."""
    base = nearest_existing(logs)
    if not os.path.isdir(base):
        return f"--logs {logs}: {base} is not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"--logs {logs}: {base} is not writable"
    return None


def claim(run_dir: str) -> None:
    with open(os.path.join(run_dir, MARKER), "w") as f:
        f.write("written by sparo_fast_training; other trainers must not write here\n")
