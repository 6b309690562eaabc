"""Greedy concept selection on a constructed case whose informative slots are known."""
import random

import torch

from sparo_fast_experiment import selection as Sel


def _case(n, L, V, good, gen):
    """Items where slots in ``good`` tell pos from neg (neg slot = -image slot) and every other slot,
    larger in norm, points the image at the negative: all slots together mostly get it wrong."""
    img = torch.randn(n, L, V, generator=gen)
    pos = torch.randn(n, L, V, generator=gen)
    neg = torch.randn(n, L, V, generator=gen)
    for s in range(L):
        if s in good:
            pos[:, s] = img[:, s]
            neg[:, s] = -img[:, s]
        else:
            img[:, s] *= 3
            neg[:, s] = img[:, s] + 0.3 * neg[:, s]
    norm = lambda x: x / x.flatten(1).norm(dim=-1)[:, None, None]  # noqa: E731
    return Sel.SlotTriplet(norm(img), norm(pos), norm(neg))


def test_greedy_forward_finds_the_informative_slots_and_scores_on_unseen_items():
    seed = random.randrange(10**6)
    print("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    good = {1, 4}
    select, test = _case(60, 6, 4, good, gen), _case(80, 6, 4, good, gen)
    assert Sel.accuracy(test, range(6)) < 0.5
    chosen, trace = Sel.greedy_forward(select)
    assert set(chosen) <= good and chosen and trace[-1] == 1.0
    assert trace == sorted(trace) and len(set(trace)) == len(trace)  # every addition strictly helped
    per = Sel.per_slot_accuracy(test)
    assert all(per[s] == 1.0 for s in good) and all(per[s] < 0.5 for s in range(6) if s not in good)
    res = Sel.evaluate({"a": select}, {"a": test})
    assert res["metrics"]["greedy_a"] == 1.0 and res["metrics"]["greedy_mean"] == 1.0
    assert res["by_category"]["a"]["all_slots_test"] == Sel.accuracy(test, range(6))
