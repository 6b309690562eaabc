"""A compositional benchmark on the built-in synthetic world (``synthetic`` v2).

SugarCrepe's seven categories rebuilt on generated scenes: each item is an image, its true
caption and a hard negative caption; a model is right when the image is closer to the true one.
Categories live in a registry (``REGISTRY``): each is one function decorated with
``@category(name, label)`` that draws a scene and its hard negative (an ``Edit``); the items, the
metrics (one accuracy per category, their mean as ``compositional_mean``, the robustness split),
the experiment's table and its plots all iterate over the registry. The seven registered here:

* ``replace_att``: one object's colour or size replaced ("a small red circle" -> "a small green circle")
* ``replace_obj``: one object's shape replaced
* ``replace_rel``: the relation replaced ("left of" -> "above")
* ``swap_att``: two objects exchange their colours (or sizes)
* ``swap_obj``: two objects exchange their shapes
* ``add_att``: the true caption leaves one object's size out; the negative adds the wrong size
* ``add_obj``: the negative adds an object that is not in the image

Further splits:

* held-out compositional (``heldout_*``): scenes with a colour-shape pair of
  ``synthetic.HELD_OUT_PAIRS`` (never in the training shards): 24-way colour-shape zero-shot on
  single objects, image-text retrieval among two-object scenes, and swap-attribute accuracy;
  ``seen_*`` are the same tasks on pairs seen in training, for reference;
* robustness (``robust_*``): every category again with clutter lines, unnamed grey blobs and
  pixel noise (``synthetic.render(corrupt=True)``), and retrieval on corrupted scenes.

Items are deterministic in (world version, split, category, index). ``select`` items (disjoint
from ``test``) are for concept selection: ``rank_slots`` ranks slots on a category's selection
items, the top k slots are kept, and the category is scored on its test items.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from sparo_fast_training import synthetic as S

BENCH_VERSION = 1  # bump when items or metrics change: the experiment then re-evaluates finished runs
PAIRS = [(c, s) for c in S.COLORS for s in S.SHAPES]  # the 24 zero-shot classes
PAIR_TEMPLATES = (lambda c, s: f"a {c} {s}", lambda c, s: f"a small {c} {s}", lambda c, s: f"a large {c} {s}")


class Item(NamedTuple):
    image: "object"  # PIL image
    pos: str
    neg: str


class Edit(NamedTuple):
    """What a category function returns: the true scene, the hard negative and which sizes each caption
    names (``None``: every size)."""
    scene: S.Scene
    neg: S.Scene
    pos_sizes: Optional[Sequence[bool]] = None
    neg_sizes: Optional[Sequence[bool]] = None


class Category(NamedTuple):
    name: str
    label: str  # the table's row name
    edit: Callable[..., Edit]  # edit(rng, heldout) -> Edit


# name -> Category, in registration order (the table's order). A new category is one function
# decorated with @category(...): items, metrics, the 7-category mean's successor, the table and the
# plots all read this registry.
REGISTRY: Dict[str, Category] = {}


def category(name: str, label: str):
    """Register ``fn(rng, heldout) -> Edit`` as a compositional category."""
    if not name.isidentifier() or name.startswith(("robust_", "select_")):
        raise ValueError(f"category name {name!r} must be an identifier without a split prefix")

    def register(fn: Callable[..., Edit]) -> Callable[..., Edit]:
        if name in REGISTRY:
            raise ValueError(f"category {name!r} is already registered")
        REGISTRY[name] = Category(name, label, fn)
        return fn
    return register


def categories() -> Tuple[str, ...]:
    """The registered categories' names, in registration order."""
    return tuple(REGISTRY)


def _other(rng: random.Random, values: Sequence[str], avoid) -> str:
    return rng.choice([v for v in values if v not in avoid])


def _scene(rng, n, heldout: bool, **kw) -> S.Scene:
    include = None
    if heldout:
        c, s = rng.choice(sorted(S.HELD_OUT_PAIRS))
        include = S.Obj(c, rng.choice(S.SIZES), s)
    return S.random_scene(rng, n, include=include, **kw)


def _replace_obj_at(sc: S.Scene, i: int, new: S.Obj) -> S.Scene:
    return S.Scene(sc.objs[:i] + (new,) + sc.objs[i + 1:], sc.relation)


@category("replace_att", "replace-attribute")
def replace_att(rng, heldout):
    """One object's colour or size replaced ("a small red circle" -> "a small green circle")."""
    sc = _scene(rng, rng.randint(1, 3), heldout)
    i = rng.randrange(len(sc.objs))
    o = sc.objs[i]
    if rng.random() < 0.5:
        new = o._replace(color=_other(rng, list(S.COLORS), {x.color for x in sc.objs}))
    else:
        new = o._replace(size=_other(rng, S.SIZES, {o.size}))
    return Edit(sc, _replace_obj_at(sc, i, new))


@category("replace_obj", "replace-object")
def replace_obj(rng, heldout):
    """One object's shape replaced."""
    sc = _scene(rng, rng.randint(1, 3), heldout)
    i = rng.randrange(len(sc.objs))
    return Edit(sc, _replace_obj_at(sc, i, sc.objs[i]._replace(shape=_other(rng, S.SHAPES, {sc.objs[i].shape}))))


@category("replace_rel", "replace-relation")
def replace_rel(rng, heldout):
    """The relation replaced ("left of" -> "above")."""
    sc = _scene(rng, 2, heldout)
    return Edit(sc, sc._replace(relation=_other(rng, S.RELATIONS, {sc.relation})))


def _swap(rng, heldout, shape: bool) -> Edit:
    while True:
        sc = _scene(rng, rng.randint(2, 3), heldout)
        i, j = sorted(rng.sample(range(len(sc.objs)), 2))
        a, b = sc.objs[i], sc.objs[j]
        if shape:
            field = "shape"
        else:  # colours always differ; sizes only sometimes
            field = "size" if a.size != b.size and rng.random() < 0.5 else "color"
        if getattr(a, field) != getattr(b, field):
            break
    objs = list(sc.objs)
    objs[i], objs[j] = a._replace(**{field: getattr(b, field)}), b._replace(**{field: getattr(a, field)})
    return Edit(sc, S.Scene(tuple(objs), sc.relation))


@category("swap_att", "swap-attribute")
def swap_att(rng, heldout):
    """Two objects exchange their colours (or sizes)."""
    return _swap(rng, heldout, shape=False)


@category("swap_obj", "swap-object")
def swap_obj(rng, heldout):
    """Two objects exchange their shapes."""
    return _swap(rng, heldout, shape=True)


@category("add_att", "add-attribute")
def add_att(rng, heldout):
    """The true caption leaves one object's size out; the negative adds the wrong size."""
    sc = _scene(rng, rng.randint(1, 3), heldout)
    i = rng.randrange(len(sc.objs))
    shown = [k != i for k in range(len(sc.objs))]
    wrong = sc.objs[i]._replace(size=_other(rng, S.SIZES, {sc.objs[i].size}))
    return Edit(sc, _replace_obj_at(sc, i, wrong), pos_sizes=shown)


@category("add_obj", "add-object")
def add_obj(rng, heldout):
    """The negative adds an object that is not in the image."""
    n = rng.randint(1, 2)
    sc = _scene(rng, n, heldout, relation="left of" if n == 2 else None)
    extra = S.Obj(_other(rng, list(S.COLORS), {o.color for o in sc.objs}), rng.choice(S.SIZES), rng.choice(S.SHAPES))
    return Edit(sc, S.Scene(sc.objs + (extra,), sc.relation or rng.choice(S.RELATIONS)))


def make_item(category: str, rng: random.Random, heldout: bool = False, corrupt: bool = False) -> Item:
    """One (image, true caption, negative caption) of a registered ``category``."""
    if category not in REGISTRY:
        raise ValueError(f"unknown category {category!r}; choose one of {categories()}")
    e = REGISTRY[category].edit(rng, heldout)
    image = S.render(e.scene, rng, corrupt=corrupt)  # drawn after the edit: the rng order fixes the items
    return Item(image, S.caption(e.scene, e.pos_sizes), S.caption(e.neg, e.neg_sizes))


def _rng(*parts) -> random.Random:
    return random.Random("compbench-v%d-%s" % (S.VERSION, "-".join(map(str, parts))))


def build_items(n: int = 300, n_select: int = 150) -> Dict[str, List[Item]]:
    """Every task's items: ``{cat}`` / ``select_{cat}`` / ``robust_{cat}`` pairs, ``heldout_swap_att``,
    ``retrieval_{seen,heldout,robust}`` (pos only) and ``zeroshot_{seen,heldout}`` (pos = class index)."""
    out: Dict[str, List[Item]] = {}
    for cat in categories():
        out[cat] = [make_item(cat, _rng("test", cat, i)) for i in range(n)]
        out[f"select_{cat}"] = [make_item(cat, _rng("select", cat, i)) for i in range(n_select)]
        out[f"robust_{cat}"] = [make_item(cat, _rng("robust", cat, i), corrupt=True) for i in range(n)]
    out["heldout_swap_att"] = [make_item("swap_att", _rng("heldout", "swap", i), heldout=True) for i in range(n)]
    for split, heldout, corrupt in (("seen", False, False), ("heldout", True, False), ("robust", False, True)):
        items = []
        for i in range(n):
            rng = _rng("retrieval", split, i)
            sc = _scene(rng, 2, heldout)
            items.append(Item(S.render(sc, rng, corrupt=corrupt), S.caption(sc), ""))
        out[f"retrieval_{split}"] = items
    for split, heldout in (("seen", False), ("heldout", True)):
        items = []
        for i in range(n):
            rng = _rng("zeroshot", split, i)
            if heldout:
                c, s = sorted(S.HELD_OUT_PAIRS)[i % len(S.HELD_OUT_PAIRS)]
                obj = S.Obj(c, rng.choice(S.SIZES), s)
            else:
                obj = S.random_scene(rng, 1).objs[0]
            items.append(Item(S.render(S.Scene((obj,), None), rng), str(PAIRS.index((obj.color, obj.shape))), ""))
        out[f"zeroshot_{split}"] = items
    return out


def selection_items(n: int) -> Dict[str, List[Item]]:
    """``n`` selection items per category (the first ``n_select`` of them are ``build_items``' select
    split): disjoint from the test items, for choosing slots per category."""
    return {cat: [make_item(cat, _rng("select", cat, i)) for i in range(n)] for cat in categories()}


# ----------------------------------------------------------------------------------- encoding
class Encoded(NamedTuple):
    """Unit-norm embeddings of one task; for SPARO models also the weighted slots [B, L, V]."""
    img: torch.Tensor
    pos: Optional[torch.Tensor]
    neg: Optional[torch.Tensor]
    img_slots: Optional[torch.Tensor] = None
    pos_slots: Optional[torch.Tensor] = None
    neg_slots: Optional[torch.Tensor] = None


def _param(model):
    return next(model.parameters())


@torch.no_grad()
def _encode(fn, xs: torch.Tensor, sparo: bool, batch_size: int):
    flat, slots = [], []
    p = _param(fn.__self__)
    for i in range(0, xs.shape[0], batch_size):
        x = xs[i:i + batch_size].to(p.device)
        if x.is_floating_point():
            x = x.to(p.dtype)
        if sparo:
            w = fn(x, normalize=True, return_sparo=True).float().cpu()
            slots.append(w)
            flat.append(w.flatten(1))
        else:
            flat.append(torch.nn.functional.normalize(fn(x, normalize=True).float(), dim=-1).cpu())
    return torch.cat(flat), (torch.cat(slots) if sparo else None)


def images_tensor(items: Sequence[Item], preprocess) -> torch.Tensor:
    return torch.stack([preprocess(it.image) for it in items])


def encode_items(model, items: Sequence[Item], preprocess, tokenizer, batch_size: int = 256,
                 images: Optional[torch.Tensor] = None) -> Encoded:
    sparo = bool(getattr(model, "use_sparo", False))
    images = images_tensor(items, preprocess) if images is None else images
    img, img_s = _encode(model.encode_image, images, sparo, batch_size)
    pos = neg = pos_s = neg_s = None
    if items and not items[0].pos.isdigit():
        pos, pos_s = _encode(model.encode_text, tokenizer([it.pos for it in items]), sparo, batch_size)
    if items and items[0].neg:
        neg, neg_s = _encode(model.encode_text, tokenizer([it.neg for it in items]), sparo, batch_size)
    return Encoded(img, pos, neg, img_s, pos_s, neg_s)


# ----------------------------------------------------------------------------------- metrics
def pair_accuracy(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Fraction of images closer to the true caption than to the negative (ties count as wrong)."""
    return ((img * pos).sum(-1) > (img * neg).sum(-1)).float().mean().item()


def retrieval_r1(img: torch.Tensor, txt: torch.Tensor, captions: Sequence[str]) -> Dict[str, float]:
    """Recall@1 both ways; a retrieved item counts when its caption equals the query's."""
    ids = {c: i for i, c in enumerate(sorted(set(captions)))}
    cid = torch.tensor([ids[c] for c in captions])
    match = cid[:, None] == cid[None, :]
    sim = img @ txt.T
    i2t = match.gather(1, sim.argmax(1, keepdim=True)).float().mean().item()
    t2i = match.T.gather(1, sim.T.argmax(1, keepdim=True)).float().mean().item()
    return {"i2t_R@1": i2t, "t2i_R@1": t2i}


@torch.no_grad()
def pair_classifier(model, tokenizer, batch_size: int = 256) -> torch.Tensor:
    """[D, 24] zero-shot weights: mean of the unit-norm template embeddings of each colour-shape class."""
    texts = [t(c, s) for c, s in PAIRS for t in PAIR_TEMPLATES]
    emb, _ = _encode(model.encode_text, tokenizer(texts), False, batch_size)
    w = torch.nn.functional.normalize(emb, dim=-1).view(len(PAIRS), len(PAIR_TEMPLATES), -1).mean(1)
    return torch.nn.functional.normalize(w, dim=-1).T


def evaluate(model, items: Dict[str, List[Item]], preprocess, tokenizer, batch_size: int = 256,
             ks: Sequence[int] = (1, 2, 4, 8), log=None) -> Dict[str, object]:
    """All metrics of one model: ``{"metrics": {name: value}, "selection": {...}}`` (selection only
    for SPARO models: per category and k, accuracy with the top-k slots ranked on its select split)."""
    from sparo_fast.clip import rank_slots, select_slots

    was_training = model.training
    model.eval()
    metrics: Dict[str, float] = {}
    enc: Dict[str, Encoded] = {}
    try:
        for name, its in items.items():
            if name.startswith("select_") or name.startswith("zeroshot_"):
                continue
            enc[name] = encode_items(model, its, preprocess, tokenizer, batch_size)
        cats = categories()
        for cat in cats:
            for prefix in ("", "robust_"):
                e = enc[prefix + cat]
                metrics[prefix + cat] = pair_accuracy(e.img, e.pos, e.neg)
        metrics["compositional_mean"] = sum(metrics[c] for c in cats) / len(cats)
        metrics["robust_mean"] = sum(metrics["robust_" + c] for c in cats) / len(cats)
        e = enc["heldout_swap_att"]
        metrics["heldout_swap_att"] = pair_accuracy(e.img, e.pos, e.neg)
        for split in ("seen", "heldout", "robust"):
            e = enc[f"retrieval_{split}"]
            for k, v in retrieval_r1(e.img, e.pos, [it.pos for it in items[f"retrieval_{split}"]]).items():
                metrics[f"retrieval_{split}_{k}"] = v
        clf = pair_classifier(model, tokenizer, batch_size)
        for split in ("seen", "heldout"):
            its = items[f"zeroshot_{split}"]
            img, _ = _encode(model.encode_image, images_tensor(its, preprocess), False, batch_size)
            labels = torch.tensor([int(it.pos) for it in its])
            metrics[f"zeroshot_pair_{split}"] = ((img @ clf).argmax(-1) == labels).float().mean().item()

        selection = None
        if getattr(model, "use_sparo", False):
            selection = {"ks": [k for k in ks if k <= model.L] + [model.L], "by_category": {}, "select_acc": {}}
            for cat in cats:
                sel_items = items[f"select_{cat}"]
                ranking = rank_slots(model, images_tensor(sel_items, preprocess),
                                     tokenizer([it.pos for it in sel_items]), batch_size=batch_size).indices.tolist()
                se = encode_items(model, sel_items, preprocess, tokenizer, batch_size)
                e = enc[cat]
                test_acc, sel_acc = [], []
                for k in selection["ks"]:
                    top = tuple(ranking[:k])
                    acc = lambda x: pair_accuracy(*(select_slots(t, top).flatten(1)  # noqa: E731
                                                    for t in (x.img_slots, x.pos_slots, x.neg_slots)))
                    test_acc.append(acc(e))
                    sel_acc.append(acc(se))
                selection["by_category"][cat] = test_acc
                selection["select_acc"][cat] = sel_acc
                # k chosen on the selection items only (the test items never pick it)
                best = max(range(len(sel_acc)), key=lambda i: (sel_acc[i], selection["ks"][i]))
                metrics[f"selected_{cat}"] = test_acc[best]
            metrics["selected_mean"] = sum(metrics[f"selected_{c}"] for c in cats) / len(cats)
    finally:
        model.train(was_training)
    return {"metrics": metrics, "selection": selection}
