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
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

import sparo_fast_training

# name -> (model, --override-model-config or None). The baselines' ViT-Tiny-* configs are ViT-Tiny
# with the published scripts' overrides (sparo_fast/clip/model_configs, sparo_fast.clip.baselines)
FAMILIES = ("clip", "dino")
DINO_MODELS = ("sparo", "clip")  # the SPARO read-out against the plain CLS head, same tower
MODELS: Dict[str, tuple] = {
    "sparo": ("ViT-Tiny-SPARO", None),
    "clip": ("ViT-Tiny", None),
    "gap": ("ViT-Tiny-GAP", None),
    "bottleneck": ("ViT-Tiny-Bottleneck", None),
    "codebook": ("ViT-Tiny-Codebook", None),
}
TRAINER = os.path.join(os.path.dirname(os.path.abspath(sparo_fast_training.__file__)), "main.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparo_fast_experiment.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (runs/, data_cache/, table.md, *.png)")
    p.add_argument("--family", choices=FAMILIES, default="clip",
                   help="clip: image-text training on compbench; dino: self-distillation, k-NN and linear probe")
    p.add_argument("--models", default=None,
                   help=f"comma-separated subset of {list(MODELS)} (dino: of {list(DINO_MODELS)}); default all")
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
    p.add_argument("--no-report", action="store_true", help="train and evaluate only")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite table.md and the plots from the ledger (results.json) without training anything")
    args = p.parse_args(argv)
    allowed = list(MODELS) if args.family == "clip" else list(DINO_MODELS)
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
    if args.threads is None and (args.device == "cpu" or (args.device == "auto" and not _cuda())):
        args.threads = 1
    return args


def budget_name(b: float) -> str:
    return f"{b:g}"


def steps_of(args, budget: float) -> int:
    return round(args.steps * budget)


def warmup_of(args, budget: float) -> int:
    return args.warmup if args.warmup is not None else max(1, steps_of(args, budget) // 10)


def run_name(family: str, key: str, seed: int, budget: float) -> str:
    b = "" if budget == 1 else f"-b{budget_name(budget)}"
    return f"{'dino-' if family == 'dino' else ''}{key}{b}-s{seed}"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def buildable(key: str) -> Optional[str]:
    """None when this checkout can build model ``key``, else the reason."""
    from sparo_fast.clip import create_model

    name, override = MODELS[key]
    try:
        create_model(name, override=override)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        return str(e)
    return None


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def train_settings(args, key: str, seed: int, budget: float = 1) -> dict:
    name, override = MODELS[key]
    return {"model": name, "override": override, "seed": seed, "steps": steps_of(args, budget),
            "batch_size": args.batch_size, "lr": args.lr, "warmup": warmup_of(args, budget), "nproc": args.nproc}


def train(args, key: str, seed: int, budget: float = 1) -> str:
    """Train (or reuse) one run; returns the exported state dict's path."""
    runs = os.path.join(args.out, "runs")
    name_ = run_name("clip", key, seed, budget)
    run_dir = os.path.join(runs, name_)
    settings = train_settings(args, key, seed, budget)
    steps, warmup = settings["steps"], settings["warmup"]
    done = _load_json(os.path.join(run_dir, "experiment.json"))
    summary = _load_json(os.path.join(run_dir, "summary.json"))
    if done == settings and summary and summary.get("export") and os.path.isfile(summary["export"]):
        print(f"[experiment] {name_}: reusing {run_dir}", flush=True)
        return summary["export"]
    shutil.rmtree(run_dir, ignore_errors=True)  # unfinished or made with other settings
    os.makedirs(runs, exist_ok=True)
    name, override = MODELS[key]
    flags = ["--model", name, "--fused-sparo", "--seed", str(seed), "--logs-dir", runs, "--name", name_,
             "--data-cache-dir", os.path.join(args.out, "data_cache"),
             "--synthetic-train-samples", str(steps * args.batch_size * args.nproc),
             "--synthetic-val-samples", "64", "--epochs", "1", "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--warmup", str(warmup), "--no-eval", "--save-frequency", "0",
             "--log-every-n-steps", str(max(1, steps // 5)), "--workers", str(args.workers),
             "--device", args.device]
    if override is not None:
        flags += ["--override-model-config", json.dumps(override)]
    if args.precision:
        flags += ["--precision", args.precision]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), TRAINER, "--"]
    else:
        cmd = [sys.executable, TRAINER]
    t0 = time.time()
    print(f"[experiment] {name_}: training {steps} steps", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(runs, f"{name_}.stdout"), "w") as log:
        rc = subprocess.call(cmd + flags, stdout=log, stderr=subprocess.STDOUT)
    summary = _load_json(os.path.join(run_dir, "summary.json"))
    if rc != 0 or not summary or not summary.get("export"):
        raise SystemExit(f"error: training {name_} failed (exit {rc}); see {runs}/{name_}.stdout")
    _write_json(os.path.join(run_dir, "experiment.json"), settings)
    print(f"[experiment] {name_}: trained in {time.time() - t0:.0f}s", flush=True)
    return summary["export"]


def load_model(key: str, export: str, device):
    from sparo_fast.clip import create_model_and_transforms, get_tokenizer, load_checkpoint

    name, override = MODELS[key]
    model, _, preprocess = create_model_and_transforms(name, override=override, device="cpu")
    load_checkpoint(model, export)
    model.to(device).eval()
    tokenizer = get_tokenizer(name if override is None else model.config)
    return model, preprocess, tokenizer


def evaluate(args, key: str, seed: int, export: str, items, device) -> dict:
    """compbench metrics of one run (reused when computed with the same settings)."""
    from . import compbench

    path = os.path.join(os.path.dirname(os.path.dirname(export)), "compbench.json")
    settings = {"n_items": args.n_items, "n_select": args.n_select, "ks": args.ks, "export": export,
                "world": compbench.S.VERSION, "bench": compbench.BENCH_VERSION}
    old = _load_json(path)
    if old and old.get("settings") == settings and all(c in old["metrics"] for c in compbench.categories()):
        return old  # a newly registered category makes the run be evaluated again
    t0 = time.time()
    model, preprocess, tokenizer = load_model(key, export, device)
    res = compbench.evaluate(model, items, preprocess, tokenizer, ks=args.ks)
    res["settings"] = settings
    res["eval_s"] = time.time() - t0
    res["train_s"] = (_load_json(os.path.join(os.path.dirname(path), "summary.json")) or {}).get("wall_s")
    _write_json(path, res)
    m = res["metrics"]
    print(f"[experiment] {key} seed {seed}: evaluated in {time.time() - t0:.0f}s: compositional mean "
          f"{m['compositional_mean']:.3f}, held-out swap {m['heldout_swap_att']:.3f}", flush=True)
    return res


def greedy(args, key: str, seed: int, export: str, items, select, device) -> Optional[dict]:
    """Greedy concept selection (``selection.py``) of a SPARO run, reused from ``greedy.json``."""
    from . import compbench, selection

    path = os.path.join(os.path.dirname(os.path.dirname(export)), "greedy.json")
    settings = {"n_greedy": args.n_greedy, "n_items": args.n_items, "export": export,
                "categories": list(compbench.categories()), "world": compbench.S.VERSION,
                "bench": compbench.BENCH_VERSION}
    old = _load_json(path)
    if old and old.get("settings") == settings:
        return old
    model, preprocess, tokenizer = load_model(key, export, device)
    if not getattr(model, "use_sparo", False):
        return None
    t0 = time.time()
    triplets = {}
    for split, its in (("select", select), ("test", items)):
        triplets[split] = {}
        for cat in compbench.categories():
            e = compbench.encode_items(model, its[cat], preprocess, tokenizer)
            triplets[split][cat] = selection.SlotTriplet(e.img_slots, e.pos_slots, e.neg_slots)
    res = selection.evaluate(triplets["select"], triplets["test"])
    res["settings"] = settings
    _write_json(path, res)
    print(f"[experiment] {key} seed {seed}: greedy selection in {time.time() - t0:.0f}s: mean "
          f"{res['metrics']['greedy_mean']:.3f}", flush=True)
    return res


def slot_panels(args, exports: Dict[str, str], items, device) -> List[str]:
    """One slot-attention figure (``sparo_fast.clip.visualize``) per trained model family that has slots."""
    from sparo_fast.clip.visualize import render

    paths = []
    item = items["swap_att"][0]
    for key, export in exports.items():
        model, preprocess, _ = load_model(key, export, device)
        if not getattr(model, "use_sparo", False):
            continue
        paths.append(str(render(model, item.image, item.pos, os.path.join(args.out, f"slots_{key}.png"), top_k=8,
                                preprocess=preprocess,
                                title=f"{key} ({MODELS[key][0]}), seed {args.seeds[0]}, {args.steps} steps")))
    return paths


def versions() -> str:
    import open_clip
    import torch

    return f"torch {torch.__version__}, open_clip {open_clip.__version__}, python {sys.version.split()[0]}"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from . import ledger

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_obj = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    book = ledger.Ledger(os.path.join(args.out, "results.json"))
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
    paths = ledger.write_report(args, book, cmd, versions(), time.time() - t_start)
    print(f"[experiment] wrote {', '.join(paths)} in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


def _buildable_or_warn(key: str) -> bool:
    why = buildable(key)
    if why is not None:
        print(f"[experiment] warning: skipping {key}: this checkout cannot build it ({why})", flush=True)
    return why is None


if __name__ == "__main__":
    sys.exit(main())
