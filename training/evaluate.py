"""Evaluation with every rank taking part (FSDP2 forwards are collectives: all ranks run the same
number of forward calls, padding with dummy batches where their slice is shorter).

Metrics: zero-shot classification (synthetic colour and shape classes; ImageNet top-1/top-5 with
``--imagenet-val``), image-text retrieval recall@1/5 (a retrieved item counts when its caption equals
the query's, since synthetic captions repeat), and compositional swap accuracy (fraction of images
whose true caption outscores its attribute-swapped negative).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import distributed as D
from . import synthetic

log = logging.getLogger("sparo_fast_training")


def _max_over_ranks(n: int, device) -> int:
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _encode_in_lockstep(fn, items: List[torch.Tensor], batch_size: int, device, dummy: torch.Tensor) -> torch.Tensor:
    """Encode ``items`` in batches; every rank makes the same number of calls (shorter ranks pad)."""
    n_batches = _max_over_ranks(math.ceil(len(items) / batch_size), device)
    feats = []
    for b in range(n_batches):
        chunk = items[b * batch_size:(b + 1) * batch_size]
        x = torch.stack(chunk) if chunk else dummy.unsqueeze(0)
        with torch.no_grad():
            f = fn(x.to(device), normalize=True).float()
        if chunk:
            feats.append(f.cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 1)


def _recall(sim: torch.Tensor, match: torch.Tensor, ks=(1, 5)) -> Dict[int, float]:
    """sim [Q, C], match [Q, C] bool: recall@k = mean over queries of any match among the top k."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[k] = match.gather(1, top).any(dim=1).float().mean().item()
    return out


def evaluate_pairs(model, samples: List[dict], tokenizer, batch_size: int, device, dummy_image: torch.Tensor,
                   context_length: int) -> Dict[str, float]:
    """Retrieval, swap accuracy and synthetic zero-shot on this rank's eval slice; metrics gathered to all ranks."""
    images = [s["image"] for s in samples]
    tokens = [s["tokens"] for s in samples]
    dummy_tok = torch.zeros(context_length, dtype=torch.long)
    img_f = _encode_in_lockstep(model.encode_image, images, batch_size, device, dummy_image)
    txt_f = _encode_in_lockstep(model.encode_text, tokens, batch_size, device, dummy_tok)
    neg_idx = [i for i, s in enumerate(samples) if s["meta"].get("neg_caption")]
    neg_tok = [tokenizer([samples[i]["meta"]["neg_caption"]])[0] for i in neg_idx]
    neg_f = _encode_in_lockstep(model.encode_text, neg_tok, batch_size, device, dummy_tok)

    local = {"index": [s["index"] for s in samples], "caption": [s["caption"] for s in samples],
             "meta": [s["meta"] for s in samples], "img": img_f, "txt": txt_f, "neg_idx": neg_idx, "neg": neg_f}
    parts = D.all_gather_object(local)
    caps, metas, imgs, txts, pos_list, neg_list = [], [], [], [], [], []
    for p in parts:
        base = len(caps)
        caps += p["caption"]
        metas += p["meta"]
        if len(p["caption"]):
            imgs.append(p["img"])
            txts.append(p["txt"])
        if p["neg_idx"]:
            pos_list += [base + i for i in p["neg_idx"]]
            neg_list.append(p["neg"])
    metrics: Dict[str, float] = {}
    if not caps:
        return metrics
    img = torch.cat(imgs)
    txt = torch.cat(txts)
    sim = img @ txt.T
    cap_ids = {c: i for i, c in enumerate(sorted(set(caps)))}
    cid = torch.tensor([cap_ids[c] for c in caps])
    match = cid[:, None] == cid[None, :]
    for k, v in _recall(sim, match).items():
        metrics[f"image_to_text_R@{k}"] = v
    for k, v in _recall(sim.T, match.T).items():
        metrics[f"text_to_image_R@{k}"] = v
    if pos_list:
        neg = torch.cat(neg_list)
        pos_sim = (img[pos_list] * txt[pos_list]).sum(-1)
        neg_sim = (img[pos_list] * neg).sum(-1)
        metrics["swap_accuracy"] = (pos_sim > neg_sim).float().mean().item()
        metrics["swap_count"] = float(len(pos_list))
    # zero-shot over single-object images labelled with colour and shape
    for attr, classes, templates in (("color", list(synthetic.COLORS), synthetic.COLOR_TEMPLATES),
                                     ("shape", list(synthetic.SHAPES), synthetic.SHAPE_TEMPLATES)):
        rows = [i for i, m in enumerate(metas) if m.get(attr) in classes]
        if not rows:
            continue
        clf = zero_shot_classifier(model, tokenizer, classes, templates, device)
        labels = torch.tensor([classes.index(metas[i][attr]) for i in rows])
        pred = (img[rows] @ clf).argmax(-1)
        metrics[f"zeroshot_{attr}_top1"] = (pred == labels).float().mean().item()
    return metrics


def zero_shot_classifier(model, tokenizer, classnames: Sequence[str], templates, device) -> torch.Tensor:
    """OpenCLIP's ``build_zero_shot_classifier`` (all ranks call it: same forwards everywhere), float32 on CPU."""
    from open_clip import build_zero_shot_classifier

    with torch.no_grad():
        w = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=10,
                                       device=device, use_tqdm=False)
    return F.normalize(w.float().cpu(), dim=0)


def imagenet_zero_shot(model, tokenizer, root: str, preprocess, batch_size: int, workers: int, device,
                       rank: int, world_size: int, limit: Optional[int] = None) -> Dict[str, float]:
    """ImageNet zero-shot top-1/top-5 with OpenCLIP's class names and templates (ImageFolder tree)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(root, transform=preprocess, allow_empty=True)
    if len(ds.classes) != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--imagenet-val {root}: {len(ds.classes)} class folders, expected "
                         f"{len(IMAGENET_CLASSNAMES)}")
    clf = zero_shot_classifier(model, tokenizer, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, device)
    n = len(ds) if limit is None else min(limit, len(ds))
    idx = list(range(rank, n, world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=batch_size,
                                         num_workers=workers, shuffle=False)
    n_batches = _max_over_ranks(len(loader), device)
    it = iter(loader)
    correct1 = correct5 = count = 0
    dummy = None
    for _ in range(n_batches):
        batch = next(it, None)
        if batch is None:
            x = dummy if dummy is not None else torch.zeros(1, 3, *ds[0][0].shape[-2:])
            with torch.no_grad():
                model.encode_image(x.to(device), normalize=True)
            continue
        x, y = batch
        dummy = x[:1]
        with torch.no_grad():
            f = model.encode_image(x.to(device), normalize=True).float().cpu()
        top = (f @ clf).topk(5, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
        count += len(y)
    t = torch.tensor([correct1, correct5, count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    c1, c5, total = t.tolist()
    return {"imagenet_top1": c1 / max(total, 1), "imagenet_top5": c5 / max(total, 1),
            "imagenet_count": total}
