"""The compositional benchmark on the synthetic world v2: item semantics, held-out pairs, metrics, report."""
import io
import math
import random

import pytest
import torch

from sparo_fast_experiment import compbench as C
from sparo_fast_experiment import report
from sparo_fast_training import synthetic as S


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _objects(text):
    """Caption -> list of (size or None, colour, shape), and the relations."""
    objs, rels = [], []
    words = text.split()
    i = 0
    while i < len(words):
        if words[i] in ("a", "an"):
            size = words[i + 1] if words[i + 1] in S.SIZES else None
            j = i + 2 if size else i + 1
            objs.append((size, words[j], words[j + 1]))
            i = j + 2
        else:
            rel = words[i] if words[i] in ("above", "below") else " ".join(words[i:i + 2])
            rels.append(rel)
            i += 1 if words[i] in ("above", "below") else 2
    return objs, rels


@pytest.mark.parametrize("cat", C.categories())
def test_items_are_deterministic_and_negatives_are_the_named_edit(cat):
    seed = random.randrange(10**6)
    a = C.make_item(cat, random.Random(seed))
    b = C.make_item(cat, random.Random(seed))
    assert (a.pos, a.neg) == (b.pos, b.neg) and _png(a.image) == _png(b.image)
    for k in range(30):
        it = C.make_item(cat, random.Random(f"{seed}-{k}"))
        assert it.pos != it.neg
        po, pr = _objects(it.pos)
        no, nr = _objects(it.neg)
        if cat == "replace_rel":
            assert po == no and pr != nr
        elif cat in ("replace_att", "replace_obj"):
            diff = [(p, n) for p, n in zip(po, no) if p != n]
            assert pr == nr and len(po) == len(no) and len(diff) == 1
            field = 2 if cat == "replace_obj" else None
            if field is not None:
                assert diff[0][0][:2] == diff[0][1][:2]
            else:
                assert diff[0][0][2] == diff[0][1][2]
        elif cat in ("swap_att", "swap_obj"):
            assert pr == nr and po != no
            assert sorted(it.pos.split()) == sorted(it.neg.split())  # same words, re-bound
        elif cat == "add_att":
            assert len(it.neg.split()) == len(it.pos.split()) + 1 and pr == nr
        elif cat == "add_obj":
            assert len(no) == len(po) + 1 and no[:len(po)] == po


def test_held_out_pairs_never_in_written_splits_and_always_in_heldout_items(tmp_path):
    for i in range(300):
        rng = random.Random(f"t-{i}")
        _, m = S.make_sample(rng, 1 + i % 3, random_sizes_in_caption=True)
        assert not set(zip(m["colors"], m["shapes"])) & S.HELD_OUT_PAIRS
    for i in range(50):
        it = C.make_item("swap_att", random.Random(i), heldout=True)
        objs, _ = _objects(it.pos)
        assert {(c, s) for _, c, s in objs} & S.HELD_OUT_PAIRS


def test_metrics_against_direct_computation():
    n, d = 37, 12
    img = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    pos = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    want = sum(float(img[i] @ pos[i]) > float(img[i] @ neg[i]) for i in range(n)) / n
    assert C.pair_accuracy(img, pos, neg) == pytest.approx(want)
    caps = [f"c{random.randrange(5)}" for _ in range(n)]
    r = C.retrieval_r1(img, img.clone(), caps)  # text = image: every query retrieves itself
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0
    r = C.retrieval_r1(img, pos, caps)
    top = (img @ pos.T).argmax(1)
    assert r["i2t_R@1"] == pytest.approx(sum(caps[i] == caps[int(top[i])] for i in range(n)) / n)


def test_evaluate_tiny_sparo_model_selection_at_all_slots_equals_full():
    from sparo_fast.clip import create_model_and_transforms, get_tokenizer

    torch.manual_seed(random.randrange(10**6))
    model, _, pre = create_model_and_transforms("ViT-Tiny-SPARO", override={"vision_cfg": {"layers": 1},
                                                                          "text_cfg": {"layers": 1}})
    items = C.build_items(n=6, n_select=5)
    res = C.evaluate(model, items, pre, get_tokenizer("ViT-Tiny-SPARO"), ks=(1, 4))
    m, sel = res["metrics"], res["selection"]
    for k, v in m.items():
        assert 0.0 <= v <= 1.0, k
    assert sel["ks"] == [1, 4, model.L]
    for cat in C.categories():
        assert len(sel["by_category"][cat]) == 3
        assert sel["by_category"][cat][-1] == pytest.approx(m[cat])  # all slots kept: the plain score
    assert m["compositional_mean"] == pytest.approx(sum(m[c] for c in C.categories()) / 7)


def test_stats_and_table():
    vals = [random.random() for _ in range(random.randint(2, 6))]
    s = report.stats(vals)
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    assert s["mean"] == pytest.approx(mean) and s["std"] == pytest.approx(std)
    assert s["half"] == pytest.approx(report.t975(n - 1) * std / math.sqrt(n))
    assert report.stats([0.3])["half"] is None
    base = {s: {"metrics": {"swap_att": 0.5 + 0.01 * s}} for s in range(3)}
    better = {s: {"metrics": {"swap_att": 0.8 + 0.01 * s + 0.001 * (s % 2)}} for s in range(3)}
    text = report.table({"sparo": base, "clip": better})
    assert "| swap-attribute |" in text and "clip − sparo" in text
    assert "**+0.30" in text  # the paired interval excludes zero


def test_registry_a_new_category_is_one_function_and_everything_picks_it_up(monkeypatch):
    assert C.categories() == ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "add_att", "add_obj")
    monkeypatch.setattr(C, "REGISTRY", dict(C.REGISTRY))  # the registration below is undone after the test

    @C.category("drop_obj", "drop-object")
    def drop_obj(rng, heldout):  # the negative leaves the last object out
        sc = C._scene(rng, rng.randint(2, 3), heldout)
        return C.Edit(sc, S.Scene(sc.objs[:-1], sc.relation if len(sc.objs) > 2 else None))

    assert C.categories()[-1] == "drop_obj" and report.label("drop_obj") == "drop-object"
    items = C.build_items(n=3, n_select=2)
    for split in ("drop_obj", "select_drop_obj", "robust_drop_obj"):
        assert len(items[split]) == {"select_drop_obj": 2}.get(split, 3)
        for it in items[split]:
            assert len(_objects(it.neg)[0]) == len(_objects(it.pos)[0]) - 1
    with pytest.raises(ValueError, match="already registered"):
        C.category("drop_obj", "x")(drop_obj)
    with pytest.raises(ValueError, match="identifier"):
        C.category("robust_x", "x")
    with pytest.raises(ValueError, match="unknown category"):
        C.make_item("nope", random.Random(0))
    runs = {s: {"metrics": {c: 0.5 for c in C.categories()} | {"compositional_mean": 0.5}} for s in range(2)}
    text = report.table({"sparo": runs, "clip": runs})
    assert "| drop-object |" in text and text.index("| add-object |") < text.index("| drop-object |")
