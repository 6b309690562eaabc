"""The paper in miniature: train SPARO and the published baselines for the same budget over several
seeds on the built-in synthetic world, evaluate them on ``compbench``, write a table and plots.

    python -m sparo_fast_experiment.run --out results/paper_cpu                     # CLIP family, budget 1
    python -m sparo_fast_experiment.run --out results/paper_cpu --budget 1,4         # + 4x the steps
    python -m sparo_fast_experiment.run --out results/paper_cpu --family dino        # SPARO with DINO

``--budget B`` multiplies ``--steps`` (same batch, warm-up steps / 10 unless given): budget 1 runs
live in ``OUT/runs/<model>-s<seed>/``, others in ``OUT/runs/<model>-b<B>-s<seed>/``, DINO runs in
``OUT/runs/dino-<model>[-b<B>]-s<seed>/`` (``experiment/dino.py``, trained in this process).
``OUT/results.json`` is the ledger of every finished run of every family and budget (with the
settings it was made with): an entry whose run folder is gone (e.g. a committed result) is reused
when its settings match, so the documented command completes an experiment without redoing it.

Each (model, seed) is trained by the trainer's command line (``training/main.py``, one process,
or ``torchrun`` with ``--nproc N``) into ``OUT/runs/<model>-s<seed>/``; its exported state dict is
evaluated into ``compbench.json`` beside it. Both steps are skipped when their output exists with
the same settings, so an interrupted experiment resumes where it stopped. ``OUT/table.md``,
``OUT/*.png`` and ``OUT/results.json`` are rewritten from every finished run at the end.

Models (``--models``): ``sparo`` (ViT-Tiny-SPARO), ``clip`` (ViT-Tiny), and the published
baselines on the same towers: ``gap`` (ViT-Tiny-GAP, global average pool), ``bottleneck``
(ViT-Tiny-Bottleneck) and ``codebook`` (ViT-Tiny-Codebook, learnable discrete tokens). A model
this checkout cannot build is skipped with a warning.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import ledger, runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparo_fast_experiment.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (runs/, data_cache/, table.md, *.png)")
    p.add_argument("--family", choices=runs.FAMILIES, default="clip",
                   help="clip: image-text training on compbench; dino: self-distillation, k-NN and linear probe")
    p.add_argument("--models", default=None,
                   help=f"comma-separated subset of {list(runs.MODELS)} (dino: of {list(runs.DINO_MODELS)}); default all")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run at budget 1 (fresh samples)")
    p.add_argument("--budget", default="1", help="comma-separated multipliers of --steps (e.g. 1,4)")
    p.add_argument("--n-greedy", type=int, default=100,
                   help="selection items per category for greedy concept selection (SPARO runs)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
    p.add_argument("--dino-lr", type=float, default=1e-4,
                   help="peak learning rate of --family dino (at 1e-3 the DINO outputs collapsed to uniform)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps / 10)")
    p.add_argument("--n-items", type=int, default=100, help="evaluation items per category and split")
    p.add_argument("--n-select", type=int, default=50, help="concept-selection items per category")
    p.add_argument("--ks", default="1,2,4,8", help="slot counts k for concept selection (all L slots added)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run: >1 launches torchrun (GPUs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="trainer and evaluation device")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="trainer precision (its default)")
    p.add_argument("--workers", type=int, default=1, help="trainer data loader workers per rank")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (trainer and evaluation); default 1 on a CPU run (one thread per "
                        "process is much faster than several on a busy machine), the trainer's own on GPUs")
    p.add_argument("--merge", action="append", default=[], metavar="DIR",
                   help="first add the finished runs of another output folder's ledger (DIR/results.json, e.g. "
                        "seeds run in parallel elsewhere) to OUT's; repeatable")
    p.add_argument("--no-report", action="store_true", help="train and evaluate only")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite table.md and the plots from the ledger (results.json) without training anything")
    args = p.parse_args(argv)
    allowed = list(runs.MODELS) if args.family == "clip" else list(runs.DINO_MODELS)
    args.models = allowed if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in allowed]
    if bad or not args.models:
        p.error(f"--models: unknown {bad} for --family {args.family}; choose from {allowed}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error("--seeds and --ks must be comma-separated integers")
    try:
        args.budget = [float(b) for b in args.budget.split(",") if b.strip()]
    except ValueError:
        p.error("--budget must be comma-separated numbers (multipliers of --steps)")
    if not args.budget or min(args.budget) <= 0 or any(round(args.steps * b) < 1 for b in args.budget):
        p.error("--budget: every multiplier must be positive and give at least one step")
    if not args.seeds or min(args.steps, args.batch_size, args.n_items, args.n_select, args.nproc) < 1:
        p.error("--seeds needs one seed; --steps, --batch-size, --n-items, --n-select, --nproc must be positive")
    if args.threads is None and (args.device == "cpu" or (args.device == "auto" and not runs.cuda_available())):
        args.threads = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_obj = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    book = ledger.Ledger(os.path.join(args.out, "results.json"))
    for other in args.merge:
        path = os.path.join(other, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --merge {other}: no results.json there")
        try:
            n = book.merge(ledger.Ledger(path))
        except ValueError as e:
            raise SystemExit(f"error: --merge: {e}")
        print(f"[experiment] merged {n} finished runs from {path}", flush=True)
    if args.report_only:
        pass
    elif args.family == "clip":
        models = [k for k in args.models if _buildable_or_warn(k)]
        if not models:
            raise SystemExit("error: none of the selected models can be built")
        ledger.run_clip(args, models, book)
    else:
        ledger.run_dino(args, book)
    if args.no_report:
        return 0
    cmd = " ".join(argv if argv is not None else sys.argv[1:])
    paths = ledger.write_report(args, book, cmd, runs.versions(), time.time() - t_start)
    print(f"[experiment] wrote {', '.join(paths)} in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


def _buildable_or_warn(key: str) -> bool:
    why = runs.buildable(key)
    if why is not None:
        print(f"[experiment] warning: skipping {key}: this checkout cannot build it ({why})", flush=True)
    return why is None


if __name__ == "__main__":
    sys.exit(main())
