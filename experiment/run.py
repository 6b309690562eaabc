"""The paper in miniature: train SPARO and the published baselines for the same budget over several
seeds on the built-in synthetic world, evaluate them on ``compbench``, write a table and plots.

    python -m sparo_fast_experiment.run --out results/paper_cpu

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
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run (one pass over fresh samples)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per rank")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule)")
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
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        p.error("--seeds and --ks must be comma-separated integers")
    if not args.seeds or min(args.steps, args.batch_size, args.n_items, args.n_select, args.nproc) < 1:
        p.error("--seeds needs one seed; --steps, --batch-size, --n-items, --n-select, --nproc must be positive")
    if args.threads is None and (args.device == "cpu" or (args.device == "auto" and not _cuda())):
        args.threads = 1
    if args.warmup is None:
        args.warmup = max(1, args.steps // 10)
    return args


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


def train_settings(args, key: str, seed: int) -> dict:
    name, override = MODELS[key]
    return {"model": name, "override": override, "seed": seed, "steps": args.steps, "batch_size": args.batch_size,
            "lr": args.lr, "warmup": args.warmup, "nproc": args.nproc}


def train(args, key: str, seed: int) -> str:
    """Train (or reuse) one run; returns the exported state dict's path."""
    runs = os.path.join(args.out, "runs")
    run_dir = os.path.join(runs, f"{key}-s{seed}")
    settings = train_settings(args, key, seed)
    done = _load_json(os.path.join(run_dir, "experiment.json"))
    summary = _load_json(os.path.join(run_dir, "summary.json"))
    if done == settings and summary and summary.get("export") and os.path.isfile(summary["export"]):
        print(f"[experiment] {key} seed {seed}: reusing {run_dir}", flush=True)
        return summary["export"]
    shutil.rmtree(run_dir, ignore_errors=True)  # unfinished or made with other settings
    os.makedirs(runs, exist_ok=True)
    name, override = MODELS[key]
    flags = ["--model", name, "--fused-sparo", "--seed", str(seed), "--logs-dir", runs, "--name", f"{key}-s{seed}",
             "--data-cache-dir", os.path.join(args.out, "data_cache"),
             "--synthetic-train-samples", str(args.steps * args.batch_size * args.nproc),
             "--synthetic-val-samples", "64", "--epochs", "1", "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--warmup", str(args.warmup), "--no-eval", "--save-frequency", "0",
             "--log-every-n-steps", str(max(1, args.steps // 5)), "--workers", str(args.workers),
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
    print(f"[experiment] {key} seed {seed}: training {args.steps} steps", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(runs, f"{key}-s{seed}.stdout"), "w") as log:
        rc = subprocess.call(cmd + flags, stdout=log, stderr=subprocess.STDOUT)
    summary = _load_json(os.path.join(run_dir, "summary.json"))
    if rc != 0 or not summary or not summary.get("export"):
        raise SystemExit(f"error: training {key} seed {seed} failed (exit {rc}); see {runs}/{key}-s{seed}.stdout")
    _write_json(os.path.join(run_dir, "experiment.json"), settings)
    print(f"[experiment] {key} seed {seed}: trained in {time.time() - t0:.0f}s", flush=True)
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
    if old and old.get("settings") == settings:
        return old
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

    from . import compbench, report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    t_start = time.time()
    models = []
    for key in args.models:
        why = buildable(key)
        if why is None:
            models.append(key)
        else:
            print(f"[experiment] warning: skipping {key}: this checkout cannot build it ({why})", flush=True)
    if not models:
        raise SystemExit("error: none of the selected models can be built")
    os.makedirs(args.out, exist_ok=True)
    items = compbench.build_items(args.n_items, args.n_select)
    results: Dict[str, Dict[int, dict]] = {}
    first_exports: Dict[str, str] = {}
    for seed in args.seeds:  # seed-major: an interrupted experiment already has every model at seed 0
        for key in models:
            export = train(args, key, seed)
            first_exports.setdefault(key, export)
            results.setdefault(key, {})[seed] = evaluate(args, key, seed, export, items, device)
    wall = time.time() - t_start
    run_s = sum((r.get("train_s") or 0) + (r.get("eval_s") or 0) for v in results.values() for r in v.values())
    _write_json(os.path.join(args.out, "results.json"),
                {"args": {k: v for k, v in vars(args).items()}, "models": {k: list(MODELS[k]) for k in models},
                 "runs": {k: {str(s): r for s, r in v.items()} for k, v in results.items()}})
    if args.no_report:
        return 0
    header = (f"# Results: {', '.join(models)} on the synthetic world v{compbench.S.VERSION}\n\n"
              f"`python -m sparo_fast_experiment.run {' '.join(argv if argv is not None else sys.argv[1:])}`"
              f" — {args.steps} steps x batch {args.batch_size} x {args.nproc} rank(s) per run; "
              f"{args.n_items} items per category; {versions()}. Time: training loops + evaluations "
              f"{run_s / 60:.1f} min summed over runs; this invocation {wall / 60:.1f} min.\n\n")
    paths = report.write_all(results, args.out, header)
    paths += slot_panels(args, first_exports, items, device)
    print(f"[experiment] wrote {', '.join(paths)} in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
