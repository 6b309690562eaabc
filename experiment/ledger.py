"""The experiment's ledger (``OUT/results.json``) and the loops over families, budgets, seeds, models.

Every finished run is one entry: family, budget, model, seed, the settings it was made with
(``key``) and its metrics. An entry is reused when the settings match, even when its run folder is
gone (the committed results keep no checkpoints), so the documented command resumes and completes
an experiment. The first format of ``results.json`` (one family, one budget, ``{"runs": {model:
{seed: result}}, "args": ...}``) is read as the CLIP family at budget 1.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Tuple

from . import runs as R

FORMAT = 2


def clip_key(args, key: str, seed: int, budget: float) -> dict:
    from . import compbench

    return {"train": R.train_settings(args, key, seed, budget),
            "eval": {"n_items": args.n_items, "n_select": args.n_select, "ks": list(args.ks),
                     "world": compbench.S.VERSION, "bench": compbench.BENCH_VERSION}}


def dino_cfg(args) -> dict:
    """DINO settings; the labelled evaluation scales with --n-items (bank 10x, each test split 4x)."""
    from . import dino

    return dict(dino.DEFAULTS, n_bank=10 * args.n_items, n_test=4 * args.n_items)


def dino_key(args, key: str, seed: int, budget: float) -> dict:
    from . import dino

    # compute-matched to a CLIP run: --batch-size crops per step, i.e. batch / (2 + n_local) images in 2 + n_local crops
    images = max(1, args.batch_size // (2 + dino.DEFAULTS["n_local"]))
    return {"model": R.MODELS[key][0], "seed": seed, "steps": R.steps_of(args, budget), "batch_size": images,
            "lr": args.dino_lr, "warmup": R.warmup_of(args, budget), "cfg": dino_cfg(args), "world": dino.S.VERSION}


class Ledger:
    def __init__(self, path: str):
        self.path = path
        self.entries: Dict[Tuple[str, str, str, int], dict] = {}
        data = R._load_json(path)
        if data and data.get("format") == FORMAT:
            for e in data["entries"]:
                self.entries[(e["family"], e["budget"], e["model"], e["seed"])] = e
        elif data and "runs" in data and "args" in data:
            self._import_v1(data)

    def _import_v1(self, data: dict) -> None:
        a = dict(data["args"])
        ns = type("Args", (), {**a, "warmup": a.get("warmup"), "nproc": a.get("nproc", 1)})
        for model, seeds in data["runs"].items():
            if model not in R.MODELS:
                continue
            for seed, r in seeds.items():
                e = dict(r, family="clip", budget="1", model=model, seed=int(seed),
                         key=clip_key(ns, model, int(seed), 1.0))
                self.entries[("clip", "1", model, int(seed))] = e

    def get(self, family: str, budget: float, model: str, seed: int, key: dict) -> Optional[dict]:
        e = self.entries.get((family, R.budget_name(budget), model, seed))
        return e if e is not None and e.get("key") == json.loads(json.dumps(key)) else None

    def put(self, family: str, budget: float, model: str, seed: int, key: dict, result: dict) -> dict:
        e = dict(result, family=family, budget=R.budget_name(budget), model=model, seed=seed, key=key)
        self.entries[(family, e["budget"], model, seed)] = e
        self.save()
        return e

    def merge(self, other: "Ledger") -> int:
        """Add ``other``'s entries (e.g. seeds run on another machine into another folder); an
        entry both hold must be the same run (same settings), else ``ValueError``. Returns the
        number of entries added."""
        added = 0
        for k, e in other.entries.items():
            mine = self.entries.get(k)
            if mine is None:
                self.entries[k] = e
                added += 1
            elif mine.get("key") != e.get("key"):
                raise ValueError(f"{other.path} and {self.path} both hold {'/'.join(map(str, k))} "
                                 "with different settings")
        if added:
            self.save()
        return added

    def save(self) -> None:
        R._write_json(self.path, {"format": FORMAT, "entries": [self.entries[k] for k in sorted(self.entries)]})

    def cell(self, family: str, budget: str, models: Optional[List[str]] = None) -> Dict[str, Dict[int, dict]]:
        """{model: {seed: entry}} of one family and budget (models in ``models`` order, else as found)."""
        out: Dict[str, Dict[int, dict]] = {}
        order = models or sorted({k[2] for k in self.entries}, key=lambda m: list(R.MODELS).index(m))
        for m in order:
            runs = {k[3]: e for k, e in sorted(self.entries.items()) if k[:3] == (family, budget, m)}
            if runs:
                out[m] = runs
        return out

    def budgets(self, family: str) -> List[str]:
        return sorted({k[1] for k in self.entries if k[0] == family}, key=float)


def run_clip(args, models: List[str], book: Ledger) -> None:
    from . import compbench

    items = compbench.build_items(args.n_items, args.n_select)
    select = compbench.selection_items(args.n_greedy)
    for budget in args.budget:
        for seed in args.seeds:  # seed-major: an interrupted experiment already has every model at seed 0
            for key in models:
                k = clip_key(args, key, seed, budget)
                name = R.run_name("clip", key, seed, budget)
                if book.get("clip", budget, key, seed, k) and not os.path.isdir(os.path.join(args.out, "runs", name)):
                    print(f"[experiment] {name}: reusing the ledger's result", flush=True)
                    continue
                export = R.train(args, key, seed, budget)
                r = R.evaluate(args, key, seed, export, items, args.device_obj)
                e = {"metrics": dict(r["metrics"]), "selection": r.get("selection"), "train_s": r.get("train_s"),
                     "eval_s": r.get("eval_s"), "export": export}
                if "SPARO" in R.MODELS[key][0]:
                    g = R.greedy(args, key, seed, export, items, select, args.device_obj)
                    if g:
                        e["metrics"].update(g["metrics"])
                        e["greedy"] = g["by_category"]
                book.put("clip", budget, key, seed, k, e)


def run_dino(args, book: Ledger) -> None:
    from . import dino

    for budget in args.budget:
        for seed in args.seeds:
            for key in args.models:
                k = dino_key(args, key, seed, budget)
                name = R.run_name("dino", key, seed, budget)
                if book.get("dino", budget, key, seed, k):
                    print(f"[experiment] {name}: reusing the ledger's result", flush=True)
                    continue
                run_dir = os.path.join(args.out, "runs", name)
                done = R._load_json(os.path.join(run_dir, "dino.json"))
                if done and done.get("key") == json.loads(json.dumps(k)):
                    print(f"[experiment] {name}: reusing {run_dir}", flush=True)
                else:
                    print(f"[experiment] {name}: training {k['steps']} steps", flush=True)
                    teacher, preprocess, train_s = dino.train(k["model"], seed, k["steps"], k["batch_size"], k["lr"],
                                                              k["warmup"], k["cfg"], log=lambda m: print(m, flush=True))
                    t0 = time.time()
                    metrics = dino.evaluate(teacher, preprocess, k["cfg"])
                    done = {"key": k, "metrics": metrics, "train_s": train_s, "eval_s": time.time() - t0}
                    os.makedirs(run_dir, exist_ok=True)
                    R._write_json(os.path.join(run_dir, "dino.json"), done)
                    print(f"[experiment] {name}: k-NN mean {metrics['knn_mean']:.3f}, probe mean "
                          f"{metrics['probe_mean']:.3f} ({train_s:.0f}s training)", flush=True)
                book.put("dino", budget, key, seed, k, {kk: v for kk, v in done.items() if kk != "key"})


def write_report(args, book: Ledger, cmd: str, versions: str, wall: float) -> List[str]:
    from . import report

    clip = {b: book.cell("clip", b) for b in book.budgets("clip")}
    dino = {b: book.cell("dino", b) for b in book.budgets("dino")}
    run_s = sum((e.get("train_s") or 0) + (e.get("eval_s") or 0) for e in book.entries.values())
    header = (f"# Results: SPARO and the published baselines on the synthetic world\n\n"
              f"`python -m sparo_fast_experiment.run {cmd}` (this table is rewritten from the whole ledger "
              f"`results.json` by every invocation). Budget 1 = {args.steps} steps x batch {args.batch_size} x "
              f"{args.nproc} rank(s) per run; budget B = B times the steps. {args.n_items} items per category; "
              f"{versions}. Time: training + evaluation {run_s / 60:.1f} min summed over the ledger's runs; "
              f"this invocation {wall / 60:.1f} min.\n\n")
    paths = report.write_all(clip, dino, args.out, header, budget1_steps=args.steps)
    exports = {}
    for key, runs in (clip.get("1") or {}).items():
        for seed in sorted(runs):
            if runs[seed].get("export") and os.path.isfile(runs[seed]["export"]):
                exports.setdefault(key, runs[seed]["export"])
    if exports:
        from . import compbench

        items = {"swap_att": [compbench.make_item("swap_att", compbench._rng("test", "swap_att", 0))]}
        paths += R.slot_panels(args, exports, items, args.device_obj)
    return paths
