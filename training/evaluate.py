"""Evaluation with every rank taking part (FSDP2 forwards are collectives: all ranks run the same
number of forward calls, padding with dummy batches where their slice is shorter).

Metrics, computed as ``open_clip_train.train.evaluate`` computes them and under its names: image-text
retrieval through OpenCLIP's own ``get_clip_metrics`` over all pairs (``image_to_text_R@1`` ...,
``*_mean_rank``, ``*_median_rank``; a repeated caption counts as a wrong answer, as there), the validation
loss ``clip_val_loss`` (OpenCLIP's ``ClipLoss`` over consecutive batches of ``--batch-size`` pairs, averaged
per pair), ``num_samples``, and ImageNet zero-shot ``imagenet-zeroshot-val-top1``/``-top5``. This project's
own metrics keep their names: zero-shot colour and shape classification on the synthetic set
(``zeroshot_color_top1``, ``zeroshot_shape_top1``) and compositional swap accuracy (``swap_accuracy``:
fraction of images whose true caption outscores its attribute-swapped negative).
"""
from __future__ import annotations

import logging
import math
import os
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


def retrieval_metrics(img: torch.Tensor, txt: torch.Tensor, logit_scale: float = 1.0) -> Dict[str, float]:
    """OpenCLIP's ``get_clip_metrics`` (text ``i`` is the right answer for image ``i`` and back):
    ``{image_to_text,text_to_image}_{R@1,R@5,R@10,mean_rank,median_rank}``, ranks counted from 1."""
    from open_clip_train.train import get_clip_metrics

    m = get_clip_metrics(img.float(), txt.float(), torch.as_tensor(float(logit_scale)))
    return {k: float(v) for k, v in m.items()}


def validation_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: float, batch_size: int) -> float:
    """OpenCLIP's ``ClipLoss`` over consecutive batches of ``batch_size`` pairs, averaged per pair (as
    ``open_clip_train.train.evaluate`` reports ``clip_val_loss``)."""
    from open_clip import ClipLoss

    loss_fn = ClipLoss()
    scale = torch.as_tensor(float(logit_scale))
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(img), batch_size):
            i, t = img[b:b + batch_size].float(), txt[b:b + batch_size].float()
            total += loss_fn(i, t, scale).item() * len(i)
    return total / max(len(img), 1)


def swap_accuracy(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Fraction of images whose true caption scores strictly above its swapped negative."""
    return ((img * pos).sum(-1) > (img * neg).sum(-1)).float().mean().item()


def logit_scale_value(model) -> float:
    """exp(logit_scale); under FSDP2 the parameter is a DTensor (gathered: every rank calls this)."""
    ls = model.logit_scale.detach()
    if hasattr(ls, "full_tensor"):
        ls = ls.full_tensor()
    return float(ls.float().exp().item())


def evaluate_pairs(model, samples: List[dict], tokenizer, batch_size: int, device, dummy_image: torch.Tensor,
                   context_length: int, logit_scale: Optional[float] = None) -> Dict[str, float]:
    """Retrieval, validation loss, swap accuracy and synthetic zero-shot on this rank's eval slice; metrics
    gathered to all ranks. ``batch_size``: the encoding batch and the validation loss's batch (OpenCLIP's
    ``--batch-size``). ``logit_scale`` (the exponentiated temperature) defaults to the model's."""
    if logit_scale is None:
        logit_scale = logit_scale_value(model)
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
    # every rank holds the pairs with index % world == rank: put them back in index order, so the figures do
    # not depend on the number of ranks
    order = sorted((idx, r, j) for r, p in enumerate(parts) for j, idx in enumerate(p["index"]))
    metrics: Dict[str, float] = {}
    if not order:
        return metrics
    caps = [parts[r]["caption"][j] for _, r, j in order]
    metas = [parts[r]["meta"][j] for _, r, j in order]
    img = torch.stack([parts[r]["img"][j] for _, r, j in order])
    txt = torch.stack([parts[r]["txt"][j] for _, r, j in order])
    metrics.update(retrieval_metrics(img, txt, logit_scale))
    metrics["clip_val_loss"] = validation_loss(img, txt, logit_scale, batch_size)
    metrics["num_samples"] = float(len(img))
    neg_of = {(r, j): p["neg"][n] for r, p in enumerate(parts) for n, j in enumerate(p["neg_idx"])}
    with_neg = [i for i, (_, r, j) in enumerate(order) if (r, j) in neg_of]
    if with_neg:
        neg = torch.stack([neg_of[order[i][1:]] for i in with_neg])
        metrics["swap_accuracy"] = swap_accuracy(img[with_neg], txt[with_neg], neg)
        metrics["swap_count"] = float(len(with_neg))
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

    ds = imagenet_folder(root, preprocess)
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
    return {"imagenet-zeroshot-val-top1": c1 / max(total, 1), "imagenet-zeroshot-val-top5": c5 / max(total, 1),
            "imagenet_count": total}


def imagenet_folder(root: str, preprocess):
    """The ImageFolder of ``--imagenet-val``: OpenCLIP's 1000 classes, at least one image (else ValueError)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision.datasets import ImageFolder

    if not os.path.isdir(root):
        raise ValueError(f"--imagenet-val {root}: not a folder")
    ds = ImageFolder(root, transform=preprocess, allow_empty=True)
    if len(ds.classes) != len(IMAGENET_CLASSNAMES):
        raise ValueError(f"--imagenet-val {root}: {len(ds.classes)} class folders, expected "
                         f"{len(IMAGENET_CLASSNAMES)} (an ImageFolder tree of ImageNet's validation set)")
    if len(ds) == 0:
        raise ValueError(f"--imagenet-val {root}: no images in its class folders")
    return ds
