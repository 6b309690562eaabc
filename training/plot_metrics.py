"""Plot the ``metrics.jsonl`` of one or several runs into one PNG, to compare runs by looking.

    python -m sparo_fast_training.plot_metrics RUN_DIR [RUN_DIR ...] --out plot.png

Panels over the optimizer step: training loss, learning rate, and every evaluation metric that the
runs logged (retrieval R@k and ranks, validation loss, swap accuracy, zero-shot top-1, ...), one line
per run. A run folder (with ``metrics.jsonl`` inside) or the file itself may be given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

TRAIN_KEYS = ("loss", "lr")
SKIP_EVAL = {"epoch", "time", "step", "kind"}


def read_metrics(path: str) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """``{kind: {metric: [(step, value), ...]}}`` from one run's metrics.jsonl (bad lines are skipped)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a run folder?)")
    out: Dict[str, Dict[str, List[Tuple[int, float]]]] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            kind, step = rec.get("kind"), rec.get("step")
            if kind not in ("train", "eval") or step is None:
                continue
            for k, v in rec.items():
                if k in SKIP_EVAL or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                out.setdefault(kind, {}).setdefault(k, []).append((int(step), float(v)))
    return out


def panels(runs: Dict[str, dict]) -> List[Tuple[str, str]]:
    """(kind, metric) of each panel: loss and lr first, then the evaluation metrics any run has."""
    out = [("train", k) for k in TRAIN_KEYS if any(k in r.get("train", {}) for r in runs.values())]
    evals = sorted({k for r in runs.values() for k in r.get("eval", {}) if not k.endswith("_count")})
    return out + [("eval", k) for k in evals]


def plot(run_paths: List[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for p in run_paths:
        label = os.path.basename(os.path.normpath(p if os.path.isdir(p) else os.path.dirname(p))) or p
        while label in runs:
            label += "'"
        runs[label] = read_metrics(p)
    which = panels(runs)
    if not which:
        raise ValueError("no training or evaluation metrics in " + ", ".join(run_paths))
    cols = min(3, len(which))
    rows = math.ceil(len(which) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (kind, key) in zip(axes.flat, which):
        for label, r in runs.items():
            pts = sorted(r.get(kind, {}).get(key, []))
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if kind == "eval" else None,
                        markersize=3, label=label)
        ax.set_title(key if kind == "train" else f"eval: {key}", fontsize=10)
        ax.set_xlabel("step")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(which):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparo_fast_training.plot_metrics",
                                 description="Plot loss, learning rate and evaluation metrics of runs.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or metrics.jsonl files)")
    ap.add_argument("--out", default="metrics.png", help="PNG to write (default: metrics.png)")
    args = ap.parse_args(argv)
    try:
        path = plot(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
