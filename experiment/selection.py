"""Concept (slot) selection per downstream task: greedy forward selection on selection items.

The published SPARO code (OpenCLIP-based training and models) ships no concept-selection
procedure; its description is "keep a chosen subset of slots (zero the others, re-normalise) to
improve a downstream task". Here the subset is chosen per category, on that category's selection
items only, by greedy forward selection: start from no slot, repeatedly add the slot whose addition
gives the highest selection accuracy (ties: the larger mean margin cos(img, pos) - cos(img, neg),
then the lower slot index), and stop when no addition raises the accuracy. The chosen subset is then
scored on the category's test items, which never took part in the choice. ``per_slot_accuracy``
gives each slot's accuracy alone (do slots specialise in a category?).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from sparo_fast.clip import select_slots


class SlotTriplet(NamedTuple):
    """Normalised slots [B, L, V] of the images, true captions and negatives of one task."""
    img: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


def margins(t: SlotTriplet, slots: Sequence[int]) -> torch.Tensor:
    """Per item cos(img, pos) - cos(img, neg) with only ``slots`` kept (each side re-normalised)."""
    img, pos, neg = (select_slots(x, tuple(slots)).flatten(1) for x in t)
    return (img * pos).sum(-1) - (img * neg).sum(-1)


def accuracy(t: SlotTriplet, slots: Sequence[int]) -> float:
    """Fraction of items whose image is closer to the true caption (ties count as wrong)."""
    return (margins(t, slots) > 0).float().mean().item()


def greedy_forward(t: SlotTriplet) -> Tuple[List[int], List[float]]:
    """The greedy subset (in the order added) and the selection accuracy after each addition."""
    L = t.img.shape[1]
    chosen: List[int] = []
    trace: List[float] = []
    best_acc = -1.0
    while len(chosen) < L:
        scored = []
        for s in range(L):
            if s in chosen:
                continue
            m = margins(t, chosen + [s])
            scored.append(((m > 0).float().mean().item(), m.mean().item(), -s))
        acc, _, neg_s = max(scored)
        if acc <= best_acc:
            break
        chosen.append(-neg_s)
        trace.append(acc)
        best_acc = acc
    return chosen, trace


def per_slot_accuracy(t: SlotTriplet) -> List[float]:
    """Accuracy of each slot used alone."""
    return [accuracy(t, [s]) for s in range(t.img.shape[1])]


def evaluate(select: Dict[str, SlotTriplet], test: Dict[str, SlotTriplet]) -> Dict[str, object]:
    """Greedy selection per category on ``select``, scored on ``test`` (same keys): metrics
    ``greedy_<cat>``, ``greedy_mean``, ``greedy_slots`` (mean subset size) and the details."""
    metrics: Dict[str, float] = {}
    detail: Dict[str, dict] = {}
    for cat, sel in select.items():
        chosen, trace = greedy_forward(sel)
        L = sel.img.shape[1]
        metrics[f"greedy_{cat}"] = accuracy(test[cat], chosen)
        detail[cat] = {"slots": chosen, "select_trace": trace, "all_slots_test": accuracy(test[cat], range(L)),
                       "per_slot_test": per_slot_accuracy(test[cat])}
    cats = list(select)
    metrics["greedy_mean"] = sum(metrics[f"greedy_{c}"] for c in cats) / len(cats)
    metrics["greedy_slots"] = sum(len(detail[c]["slots"]) for c in cats) / len(cats)
    return {"metrics": metrics, "by_category": detail}
