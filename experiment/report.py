"""Statistics, the Markdown table and the PNG plots of ``experiment`` (matplotlib, Agg backend).

Intervals are Student-t 95% intervals over seeds: per model ``mean +- t(0.975, n-1) * std / sqrt(n)``;
differences to SPARO are paired by seed (same seed: same data order and evaluation items), so the
interval of a difference is the t interval of the per-seed differences. With one seed no interval
is given.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

from .compbench import CATEGORIES

# two-sided 95% Student-t quantiles t(0.975, df), df = 1..30 (beyond: the normal 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)

LABELS = {
    "replace_att": "replace-attribute", "replace_obj": "replace-object", "replace_rel": "replace-relation",
    "swap_att": "swap-attribute", "swap_obj": "swap-object", "add_att": "add-attribute", "add_obj": "add-object",
    "compositional_mean": "**mean of the 7 categories**",
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
}
HEADLINE = ("swap_att", "swap_obj", "replace_att", "replace_obj", "replace_rel", "compositional_mean",
            "heldout_swap_att", "zeroshot_pair_heldout", "retrieval_heldout_i2t_R@1", "robust_mean")


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean, sample std and 95% t half-width (None with fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "half": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "half": t975(n - 1) * std / math.sqrt(n)}


def add_derived(results: Dict[str, Dict[int, dict]]) -> None:
    """``selection_gain`` = selected_mean - compositional_mean (per run, models with slots)."""
    for runs in results.values():
        for r in runs.values():
            m = r["metrics"]
            if "selected_mean" in m and "compositional_mean" in m:
                m["selection_gain"] = m["selected_mean"] - m["compositional_mean"]


def metric_order(results: Dict[str, Dict[int, dict]]) -> List[str]:
    names = {k for runs in results.values() for r in runs.values() for k in r["metrics"]}
    ordered = [k for k in list(CATEGORIES) + [k for k in LABELS if k not in CATEGORIES] if k in names]
    rest = sorted(names - set(ordered))
    return ordered + rest


def _fmt(s: Dict[str, Optional[float]]) -> str:
    if s["half"] is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['mean'] - s['half']:.3f}, {s['mean'] + s['half']:.3f}]"


def paired_diff(a: Dict[int, dict], b: Dict[int, dict], metric: str) -> Optional[Dict[str, Optional[float]]]:
    """Per-seed differences a - b over the seeds both have."""
    seeds = sorted(s for s in a if s in b and metric in a[s]["metrics"] and metric in b[s]["metrics"])
    if not seeds:
        return None
    return stats([a[s]["metrics"][metric] - b[s]["metrics"][metric] for s in seeds])


def table(results: Dict[str, Dict[int, dict]], ref: str = "sparo") -> str:
    """Markdown: per-model mean ± std [95% interval], then differences to ``ref`` (paired by seed)."""
    models = list(results)
    metrics = metric_order(results)
    seeds = sorted({s for runs in results.values() for s in runs})
    out = [f"Seeds: {', '.join(map(str, seeds))}. Cells: mean ± std [95% t interval over seeds].", ""]
    out.append("| metric | " + " | ".join(models) + " |")
    out.append("| --- |" + " ---: |" * len(models))
    for m in metrics:
        cells = []
        for model in models:
            vals = [r["metrics"][m] for _, r in sorted(results[model].items()) if m in r["metrics"]]
            cells.append(_fmt(stats(vals)) if vals else "–")
        out.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    others = [m for m in models if m != ref]
    if ref in results and others:
        out += ["", f"Differences to {ref} (model − {ref}), paired by seed: mean [95% t interval]; "
                    f"**bold**: the interval excludes 0.", ""]
        out.append("| metric | " + " | ".join(f"{m} − {ref}" for m in others) + " |")
        out.append("| --- |" + " ---: |" * len(others))
        for m in metrics:
            has = [any(m in r["metrics"] for r in results[x].values()) for x in [ref] + others]
            if not has[0] or not any(has[1:]):
                continue  # a metric of the reference only (concept selection): nothing to compare
            cells = []
            for model in others:
                d = paired_diff(results[model], results[ref], m)
                if d is None:
                    cells.append("–")
                elif d["half"] is None:
                    cells.append(f"{d['mean']:+.3f}")
                else:
                    lo, hi = d["mean"] - d["half"], d["mean"] + d["half"]
                    txt = f"{d['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                    cells.append(f"**{txt}**" if lo > 0 or hi < 0 else txt)
            out.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
            per_seed = [[sum(s["by_category"][c][i] for c in CATEGORIES) / len(CATEGORIES) for i in range(len(ks))]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: Dict[str, Dict[int, dict]], out: str, header: str = "") -> List[str]:
    """table.md and the plots under ``out``; returns the written paths."""
    os.makedirs(out, exist_ok=True)
    add_derived(results)
    paths = []
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(header + table(results))
    paths.append(os.path.join(out, "table.md"))
    cats = list(CATEGORIES) + ["compositional_mean"]
    paths.append(bars(results, cats, os.path.join(out, "categories.png"),
                      "Compositional categories (image: true vs hard-negative caption); 95% intervals",
                      chance=0.5))
    splits = ["heldout_swap_att", "zeroshot_pair_heldout", "retrieval_heldout_i2t_R@1", "zeroshot_pair_seen",
              "retrieval_seen_i2t_R@1", "robust_mean", "retrieval_robust_i2t_R@1", "selected_mean"]
    paths.append(bars(results, splits, os.path.join(out, "splits.png"),
                      "Held-out pairs, seen pairs, robustness, concept selection; 95% intervals"))
    p = selection_curve(results, os.path.join(out, "concept_selection.png"))
    if p:
        paths.append(p)
    return paths
