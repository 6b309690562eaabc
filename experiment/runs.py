"""The pieces of the experiment: the models, training one (model, seed) through the trainer's
command line, evaluating it on ``compbench``, greedy slot selection and slot panels
(``run.py`` is the command line, ``ledger.py`` the record of finished runs)."""
from __future__ import annotations

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


def budget_name(b: float) -> str:
    return f"{b:g}"


def steps_of(args, budget: float) -> int:
    return round(args.steps * budget)


def warmup_of(args, budget: float) -> int:
    return args.warmup if args.warmup is not None else max(1, steps_of(args, budget) // 10)


def run_name(family: str, key: str, seed: int, budget: float) -> str:
    b = "" if budget == 1 else f"-b{budget_name(budget)}"
    return f"{'dino-' if family == 'dino' else ''}{key}{b}-s{seed}"


def cuda_available() -> bool:
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
