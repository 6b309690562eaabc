"""Statistics, the Markdown table and the PNG plots of ``experiment`` (matplotlib, Agg backend).

Intervals are Student-t 95% intervals over seeds: per model ``mean +- t(0.975, n-1) * std / sqrt(n)``;
differences to SPARO are paired by seed (same seed: same data order and evaluation items), so the
interval of a difference is the t interval of the per-seed differences. With one seed no interval
is given.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from . import compbench
from .stats import holm, seeds_for_power, stats, t975  # noqa: F401  (stats, t975: the report's API)

LABELS = {
    "compositional_mean": "**mean of the categories**",
    "heldout_swap_att": "held-out pairs: swap-attribute",
    "zeroshot_pair_heldout": "held-out pairs: zero-shot (24 colour-shape classes)",
    "retrieval_heldout_i2t_R@1": "held-out pairs: image-to-text R@1",
    "retrieval_heldout_t2i_R@1": "held-out pairs: text-to-image R@1",
    "zeroshot_pair_seen": "seen pairs: zero-shot (24 classes)",
    "retrieval_seen_i2t_R@1": "seen pairs: image-to-text R@1",
    "retrieval_seen_t2i_R@1": "seen pairs: text-to-image R@1",
    "robust_mean": "robustness: mean of the 7 categories (clutter + noise)",
    "retrieval_robust_i2t_R@1": "robustness: image-to-text R@1",
    "selected_mean": "concept selection: mean of the 7 categories (top-k slots, k chosen on a selection split)",
    "selection_gain": "concept selection: gain over all slots (selected − all)",
    "greedy_mean": "greedy concept selection: mean of the categories (slots chosen per category on selection items)",
    "greedy_gain": "greedy concept selection: gain over all slots (selected − all, test items)",
    "greedy_slots": "greedy concept selection: slots kept (mean over categories)",
}
for _m, _name in (("knn", "k-NN"), ("probe", "linear probe")):
    LABELS.update({f"{_m}_mean": f"**{_name}: mean of the 4 tasks**", f"{_m}_shape": f"{_name}: shape (4 classes)",
                   f"{_m}_color": f"{_name}: colour (6 classes)", f"{_m}_pair": f"{_name}: colour-shape pair (20 seen)",
                   f"{_m}_heldout_pair": f"{_name}: held-out pairs (colour and shape both right)",
                   f"robust_{_m}_shape": f"robustness, {_name}: shape", f"robust_{_m}_color": f"robustness, {_name}: colour",
                   f"robust_{_m}_pair": f"robustness, {_name}: pair"})


def label(metric: str) -> str:
    """The table's row name: a registered category's label, else ``LABELS``, else the key."""
    if metric in compbench.REGISTRY:
        return compbench.REGISTRY[metric].label
    return LABELS.get(metric, metric)
HEADLINE = ("swap_att", "swap_obj", "replace_att", "replace_obj", "replace_rel", "compositional_mean",
            "heldout_swap_att", "zeroshot_pair_heldout", "retrieval_heldout_i2t_R@1", "robust_mean")


def add_derived(results: Dict[str, Dict[int, dict]]) -> None:
    """``selection_gain`` = selected_mean - compositional_mean (per run, models with slots)."""
    for runs in results.values():
        for r in runs.values():
            m = r["metrics"]
            if "selected_mean" in m and "compositional_mean" in m:
                m["selection_gain"] = m["selected_mean"] - m["compositional_mean"]
            if "greedy_mean" in m and "compositional_mean" in m:
                m["greedy_gain"] = m["greedy_mean"] - m["compositional_mean"]


def metric_order(results: Dict[str, Dict[int, dict]]) -> List[str]:
    names = {k for runs in results.values() for r in runs.values() for k in r["metrics"]}
    cats = compbench.categories()
    ordered = [k for k in list(cats) + [k for k in LABELS if k not in cats] if k in names]
    rest = sorted(names - set(ordered))
    return ordered + rest


def _fmt(s: Dict[str, Optional[float]]) -> str:
    if s["half"] is None:
        return f"{s['mean']:.3f} (n={s['n']})"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['mean'] - s['half']:.3f}, {s['mean'] + s['half']:.3f}] (n={s['n']})"


def paired_diff(a: Dict[int, dict], b: Dict[int, dict], metric: str) -> Optional[Dict[str, Optional[float]]]:
    """Per-seed differences a - b over the seeds both have."""
    seeds = sorted(s for s in a if s in b and metric in a[s]["metrics"] and metric in b[s]["metrics"])
    if not seeds:
        return None
    return stats([a[s]["metrics"][metric] - b[s]["metrics"][metric] for s in seeds])


def _seed_counts(results: Dict[str, Dict[int, dict]]) -> str:
    parts = []
    for model, runs in results.items():
        seeds = sorted(runs)
        parts.append(f"{model}: {len(seeds)} ({', '.join(map(str, seeds))})")
    return "; ".join(parts)


def _diff_cells(results, ref: str, others: Sequence[str], metric: str) -> List[str]:
    """One row of the differences table: paired mean [95% t interval] and Holm-adjusted p over the
    row's comparisons; bold where Holm rejects at 0.05 (family-wise, per row)."""
    diffs = [paired_diff(results[model], results[ref], metric) for model in others]
    adj = holm([d["p"] if d else None for d in diffs])
    cells = []
    for d, p in zip(diffs, adj):
        if d is None:
            cells.append("–")
        elif d["half"] is None:
            cells.append(f"{d['mean']:+.3f} (n={d['n']})")
        else:
            lo, hi = d["mean"] - d["half"], d["mean"] + d["half"]
            txt = f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] p_Holm={p:.3f} (n={d['n']})"
            cells.append(f"**{txt}**" if p <= 0.05 else txt)
    return cells


def table(results: Dict[str, Dict[int, dict]], ref: str = "sparo") -> str:
    """Markdown: per-model mean ± std [95% interval] (n seeds), then differences to ``ref`` paired by
    seed with Holm's correction over the comparisons of each row."""
    models = list(results)
    metrics = metric_order(results)
    out = [f"Seeds per model: {_seed_counts(results)}. Cells: mean ± std [95% t interval over seeds] "
           "(n = seeds in the cell).", ""]
    out.append("| metric | " + " | ".join(models) + " |")
    out.append("| --- |" + " ---: |" * len(models))
    for m in metrics:
        cells = []
        for model in models:
            vals = [r["metrics"][m] for _, r in sorted(results[model].items()) if m in r["metrics"]]
            cells.append(_fmt(stats(vals)) if vals else "–")
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    others = [m for m in models if m != ref]
    if ref in results and others:
        out += ["", f"Differences to {ref} (model − {ref}), paired by seed: mean [95% t interval], the two-sided "
                    f"paired t-test's p-value adjusted by Holm's method over the {len(others)} comparisons of the "
                    f"row (family-wise error at most 5% per row), n = seeds both models have; **bold**: Holm "
                    f"rejects equality at 0.05.", ""]
        out.append("| metric | " + " | ".join(f"{m} − {ref}" for m in others) + " |")
        out.append("| --- |" + " ---: |" * len(others))
        for m in metrics:
            has = [any(m in r["metrics"] for r in results[x].values()) for x in [ref] + others]
            if not has[0] or not any(has[1:]):
                continue  # a metric of the reference only (concept selection): nothing to compare
            out.append(f"| {label(m)} | " + " | ".join(_diff_cells(results, ref, others, m)) + " |")
    return "\n".join(out) + "\n"


def power_table(results: Dict[str, Dict[int, dict]], ref: str = "sparo", metric: str = "compositional_mean",
                delta: float = 0.03, power: float = 0.8, alpha: float = 0.05) -> str:
    """Seeds needed per comparison to resolve a paired difference ``delta`` on ``metric`` with the
    given power, from the per-seed spread of the paired differences in ``results``; at level ``alpha``
    and at ``alpha / m`` (Bonferroni over the m comparisons: the first step of Holm's method)."""
    others = [m for m in results if m != ref]
    rows = [f"| comparison | seeds now | sd of paired differences | n at α={alpha:g} | "
            f"n at α={alpha:g}/{len(others)} (Holm's first step) |", "| --- | ---: | ---: | ---: | ---: |"]
    for model in others:
        d = paired_diff(results[ref], results[model], metric)
        if d is None or d["std"] is None:
            rows.append(f"| {ref} − {model} | {d['n'] if d else 0} | – | – | – |")
            continue
        n1 = seeds_for_power(d["std"], delta, alpha, power)
        n2 = seeds_for_power(d["std"], delta, alpha / len(others), power)
        rows.append(f"| {ref} − {model} | {d['n']} | {d['std']:.4f} | {n1} | {n2} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Every figure of the report: tight layout, 110 dpi, closed after writing; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


SHORT = {"compositional_mean": "mean", "heldout_swap_att": "held-out\nswap-att",
         "zeroshot_pair_heldout": "held-out\nzero-shot", "retrieval_heldout_i2t_R@1": "held-out\ni2t R@1",
         "zeroshot_pair_seen": "seen\nzero-shot", "retrieval_seen_i2t_R@1": "seen\ni2t R@1",
         "robust_mean": "robust\nmean", "retrieval_robust_i2t_R@1": "robust\ni2t R@1",
         "selected_mean": "selected\nslots mean"}


def bars(results: Dict[str, Dict[int, dict]], metrics: Sequence[str], path: str, title: str,
         chance: Optional[float] = None) -> str:
    """Grouped bars (one group per metric, one bar per model) with 95% interval error bars."""
    plt = _plt()
    metrics = [m for m in metrics if any(m in r["metrics"] for runs in results.values() for r in runs.values())]
    models = list(results)
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(metrics) + 2), 4.2))
    for j, model in enumerate(models):
        means, errs = [], []
        for m in metrics:
            vals = [r["metrics"][m] for r in results[model].values() if m in r["metrics"]]
            s = stats(vals) if vals else {"mean": float("nan"), "half": None}
            means.append(s["mean"])
            errs.append(s["half"] or 0.0)
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(metrics))]
        ax.bar(xs, means, width, yerr=errs, capsize=2, label=model)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([SHORT.get(m, m.replace("_", "\n")) for m in metrics], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(models) + 1, 6), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _save(fig, path)


def selection_curve(results: Dict[str, Dict[int, dict]], path: str) -> Optional[str]:
    """Mean test accuracy over the 7 categories as a function of k (top-k slots), ± 95% interval;
    baselines (no slots) as horizontal lines at their all-feature mean."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for model, runs in results.items():
        sel = [r["selection"] for r in runs.values() if r.get("selection")]
        if sel:
            ks = sel[0]["ks"]
            per_seed = [[sum(s["by_category"][c][i] for c in compbench.categories()) / len(compbench.categories()) for i in range(len(ks))]
                        for s in sel]
            st = [stats([p[i] for p in per_seed]) for i in range(len(ks))]
            mean = [s["mean"] for s in st]
            half = [s["half"] or 0.0 for s in st]
            ax.errorbar(ks, mean, yerr=half, marker="o", capsize=3, label=f"{model}: top-k slots")
            drawn = True
        else:
            vals = [r["metrics"]["compositional_mean"] for r in runs.values() if "compositional_mean" in r["metrics"]]
            if vals:
                ax.axhline(stats(vals)["mean"], linestyle="--", linewidth=1, label=f"{model} (no slots)",
                           color=f"C{list(results).index(model)}")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("k (slots kept, ranked by rank_slots on each category's selection split)")
    ax.set_ylabel("mean accuracy over the 7 categories (test split)")
    ax.set_title("Concept selection", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def budget_gap(clip: Dict[str, Dict[str, Dict[int, dict]]], path: str, ref: str = "sparo",
               metric: str = "compositional_mean", budget1_steps: int = 120) -> Optional[str]:
    """Paired difference (model − ref) on ``metric`` against the budget, ± 95% interval, one line per model."""
    budgets = sorted(clip, key=float)
    models = sorted({m for cell in clip.values() for m in cell if m != ref}, key=lambda m: list(LINE_ORDER).index(m)
                    if m in LINE_ORDER else 99)
    if not budgets or not models:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for j, model in enumerate(models):
        xs, ys, es, ns = [], [], [], []
        for b in budgets:
            cell = clip[b]
            d = paired_diff(cell[model], cell[ref], metric) if model in cell and ref in cell else None
            if d is not None:
                xs.append(float(b) * (1 + 0.03 * (j - len(models) / 2)))  # dodge the error bars
                ys.append(d["mean"])
                es.append(d["half"] or 0.0)
                ns.append(d["n"])
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{model} − {ref} (n={','.join(map(str, ns))})")
    ax.axhline(0, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks([float(b) for b in budgets])
    ax.set_xticklabels([f"{b}x ({round(float(b) * budget1_steps)} steps)" for b in budgets])
    ax.set_xlabel("training budget")
    ax.set_ylabel(f"paired difference in {label(metric).strip('*')}")
    ax.set_title("Gap to SPARO against budget (95% t intervals over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


LINE_ORDER = ("clip", "codebook", "gap", "bottleneck")


def slot_heatmap(results: Dict[str, Dict[int, dict]], path: str, model: str = "sparo") -> Optional[str]:
    """Each slot's accuracy alone on each category's test items and the greedy subset, for the first
    seed with greedy details (slot indices mean nothing across seeds): do slots specialise?"""
    seeds = [s for s, r in sorted(results.get(model, {}).items()) if r.get("greedy")]
    if not seeds:
        return None
    runs = [results[model][seeds[0]]]
    cats = [c for c in compbench.categories() if all(c in r["greedy"] for r in runs)]
    L = len(runs[0]["greedy"][cats[0]]["per_slot_test"])
    acc = [[sum(r["greedy"][c]["per_slot_test"][s] for r in runs) / len(runs) for s in range(L)] for c in cats]
    freq = [[sum(s in r["greedy"][c]["slots"] for r in runs) / len(runs) for s in range(L)] for c in cats]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, data, title, vmin in ((axes[0], acc, "accuracy of each slot alone (test items)", 0.3),
                                  (axes[1], freq, "slots kept by greedy selection (selection items)", 0.0)):
        im = ax.imshow(data, aspect="auto", vmin=vmin, vmax=1.0, cmap="viridis")
        ax.set_yticks(range(len(cats)))
        ax.set_yticklabels([label(c) for c in cats], fontsize=8)
        ax.set_xticks(range(L))
        ax.set_xlabel("slot")
        ax.set_title(f"{title}, seed {seeds[0]}", fontsize=9)
        fig.colorbar(im, ax=ax)
    return _save(fig, path)


def write_all(clip: Dict[str, Dict[str, Dict[int, dict]]], dino: Optional[Dict[str, Dict[str, Dict[int, dict]]]],
              out: str, header: str = "", budget1_steps: int = 120) -> List[str]:
    """table.md (a section per family and budget, the power calculation) and the plots under ``out``."""
    os.makedirs(out, exist_ok=True)
    dino = dino or {}
    for cells in list(clip.values()) + list(dino.values()):
        add_derived(cells)
    text = [header]
    if "1" in clip and "sparo" in clip["1"]:
        text += ["## Seeds needed (power)", "",
                 "From the paired per-seed differences on the mean of the categories at budget 1 (this ledger): seeds "
                 "for a two-sided paired t-test to detect a 0.03 difference with power 0.8 (normal per-seed "
                 "differences, their sd taken as the sample sd below).", "", power_table(clip["1"])]
    for b in sorted(clip, key=float):
        text += [f"## CLIP family, budget {b} ({round(float(b) * budget1_steps)} steps)", "", table(clip[b])]
    for b in sorted(dino, key=float):
        text += [f"## DINO, budget {b} ({round(float(b) * budget1_steps)} steps): SPARO read-out (sparo) against the "
                 "CLS head (clip)", "", table(dino[b])]
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(text))
    paths = [os.path.join(out, "table.md")]
    main = clip.get("1") or (clip[min(clip, key=float)] if clip else None)
    if main:
        cats = list(compbench.categories()) + ["compositional_mean"]
        paths.append(bars(main, cats, os.path.join(out, "categories.png"),
                          "Compositional categories (image: true vs hard-negative caption); 95% intervals", chance=0.5))
        splits = ["heldout_swap_att", "zeroshot_pair_heldout", "retrieval_heldout_i2t_R@1", "zeroshot_pair_seen",
                  "retrieval_seen_i2t_R@1", "robust_mean", "retrieval_robust_i2t_R@1", "selected_mean", "greedy_mean"]
        paths.append(bars(main, splits, os.path.join(out, "splits.png"),
                          "Held-out pairs, seen pairs, robustness, concept selection; 95% intervals"))
        for p in (selection_curve(main, os.path.join(out, "concept_selection.png")),
                  slot_heatmap(main, os.path.join(out, "slots_by_category.png"))):
            if p:
                paths.append(p)
    if clip:
        p = budget_gap(clip, os.path.join(out, "budget_gap.png"), budget1_steps=budget1_steps)
        if p:
            paths.append(p)
    if dino.get("1"):
        from .dino import TASKS

        metrics = [f"{m}_{t}" for m in ("knn", "probe") for t in TASKS]
        paths.append(bars(dino["1"], metrics, os.path.join(out, "dino.png"),
                          "DINO: k-NN and linear probe on the world's labels; 95% intervals"))
    return paths
