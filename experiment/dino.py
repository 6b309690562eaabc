"""SPARO with DINO, in miniature: self-distillation on the synthetic world with a SPARO read-out
head against the plain CLS head, evaluated by k-NN and a linear probe on the world's labels.

The backbone is the vision tower of the experiment's CLIP models (OpenCLIP's ``VisionTransformer``
at 64x64, patch 8, width 128, 3 layers): ``ViT-Tiny`` ends in the CLS token's projection,
``ViT-Tiny-SPARO`` in ``sparo_fast.SparoReadout`` (16 slots of 16, unit norm overall). Either
embedding [B, 256] feeds a DINO projection head (3-layer MLP, L2-normalised bottleneck,
weight-normalised prototypes). Student and teacher start equal; the teacher is an exponential
moving average of the student (momentum 0.99 -> 1 on a cosine); the loss is the cross-entropy
between the teacher's centred, sharpened softmax (temperature 0.04, centre an EMA of teacher
outputs with momentum 0.9) of each global view and the student's softmax (temperature 0.1) of
every other view.

Budget: the same steps as a CLIP run and the same number of crops through the student per step as
a CLIP run has images (``--batch-size`` 32: 8 images in 4 crops each). Peak learning rate 1e-4
(``--dino-lr``; AdamW, weight decay 0.04, cosine after 10% warm-up): at the CLIP runs' 1e-3 the
outputs collapsed to uniform (training loss = log K from step 25 on, on a seed outside the
evaluated ones), at 1e-4 they did not within 60 steps; no other setting was tried. Multi-crop, kept CPU-cheap: 2 global crops (scale 0.4-1) and 2 local crops (scale 0.1-0.4), all
resized to 64x64 (the towers have a fixed position grid) with horizontal flips. No colour
jitter, grey-scale or solarisation: colour is one of the labels evaluated.

The DINO loss and head are written here (a few lines): ``lightly`` has both, but installing it
pulls pytorch-lightning, hydra-core and aiohttp into the environment, and its DINO transform
jitters colour.

Evaluation on the teacher's embedding (as DINO does), single-object images of the world:
shape (4 classes), colour (6), colour-shape pair (the 20 seen pairs) and held-out pairs (the 4
pairs never drawn in training: colour and shape predicted separately by classifiers fitted on
seen pairs, right when both are), each by weighted 20-NN (cosine, temperature 0.07) and by a
linear probe (multinomial logistic regression, L-BFGS, L2 1e-3, on standardised features), and
the same on corrupted images (clutter and noise) as robustness.
"""
from __future__ import annotations

import copy
import math
import random
import time
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparo_fast_training import synthetic as S

TASKS = ("shape", "color", "pair", "heldout_pair")
DEFAULTS = {"out_dim": 1024, "hidden": 512, "bottleneck": 64, "t_student": 0.1, "t_teacher": 0.04,
            "center_momentum": 0.9, "teacher_momentum": 0.99, "n_local": 2, "knn_k": 20, "n_bank": 1000,
            "n_test": 400}


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer onto ``out_dim`` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False  # unit-norm prototypes, as DINO

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              t_student: float, t_teacher: float) -> torch.Tensor:
    """Mean over (teacher view i, student view j != i) of the cross-entropy
    H(softmax((teacher_i - center) / t_teacher), softmax(student_j / t_student)); teacher views are the
    first ``len(teacher)`` student views (the global crops). Teacher outputs carry no gradient."""
    targets = [F.softmax((t.detach() - center) / t_teacher, dim=-1) for t in teacher]
    logps = [F.log_softmax(s / t_student, dim=-1) for s in student]
    total, terms = 0.0, 0
    for i, p in enumerate(targets):
        for j, logp in enumerate(logps):
            if i != j:
                total = total + (-(p * logp).sum(-1)).mean()
                terms += 1
    return total / terms


class Dino(nn.Module):
    """Backbone (a CLIP model's image encoder) + DINO head; ``embed`` is what k-NN and probes see."""

    def __init__(self, clip_model, head: DinoHead):
        super().__init__()
        self.visual = clip_model.visual
        self._encode = type(clip_model).encode_image
        self._owner = [clip_model]  # not a submodule: only the visual tower is trained
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(self._owner[0], x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build(model_name: str, seed: int, cfg: Dict = DEFAULTS) -> Tuple[Dino, object]:
    from sparo_fast.clip import create_model_and_transforms

    torch.manual_seed(seed)
    clip_model, _, preprocess = create_model_and_transforms(model_name, device="cpu")
    emb = clip_model.encode_image(torch.zeros(1, 3, S.IMAGE_SIZE, S.IMAGE_SIZE)).shape[-1]
    return Dino(clip_model, DinoHead(emb, cfg["out_dim"], cfg["hidden"], cfg["bottleneck"])), preprocess


def _normalizer(preprocess):
    from torchvision.transforms import Normalize

    norm = [t for t in getattr(preprocess, "transforms", []) if isinstance(t, Normalize)]
    mean, std = (norm[0].mean, norm[0].std) if norm else ((0.5,) * 3, (0.5,) * 3)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def multicrop(images: torch.Tensor, n_local: int, gen: torch.Generator) -> List[torch.Tensor]:
    """2 global and ``n_local`` local random resized crops (all 64x64) with random flips: [B, 3, H, W]
    float images in, one batch per view out."""
    B, _, H, W = images.shape
    views = []
    for v in range(2 + n_local):
        lo, hi = (0.4, 1.0) if v < 2 else (0.1, 0.4)
        out = torch.empty_like(images)
        for b in range(B):
            area = H * W * (lo + (hi - lo) * torch.rand((), generator=gen).item())
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand((), generator=gen).item())
            h = max(4, min(H, round(math.sqrt(area / ratio))))
            w = max(4, min(W, round(math.sqrt(area * ratio))))
            y = int(torch.randint(0, H - h + 1, (), generator=gen))
            x = int(torch.randint(0, W - w + 1, (), generator=gen))
            crop = F.interpolate(images[b:b + 1, :, y:y + h, x:x + w], size=(H, W), mode="bilinear",
                                 align_corners=False, antialias=True)
            out[b] = crop[0].flip(-1) if torch.rand((), generator=gen).item() < 0.5 else crop[0]
        views.append(out)
    return views


def _to_tensor(imgs) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.uint8) for i in imgs])).permute(0, 3, 1, 2).float() / 255


def _schedule(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model_name: str, seed: int, steps: int, batch_size: int, lr: float, warmup: int,
          cfg: Dict = DEFAULTS, log=print) -> Tuple[Dino, object, float]:
    """Self-distillation for ``steps`` steps on fresh synthetic images; returns (teacher, preprocess, seconds)."""
    t0 = time.time()
    student, preprocess = build(model_name, seed, cfg)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    mean, std = _normalizer(preprocess)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.04)
    center = torch.zeros(cfg["out_dim"])
    rng, gen = random.Random(f"dino-{seed}"), torch.Generator().manual_seed(seed)
    student.train()
    for step in range(steps):
        imgs = [S.make_sample(rng, rng.randint(1, 3))[0] for _ in range(batch_size)]
        views = [(v - mean) / std for v in multicrop(_to_tensor(imgs), cfg["n_local"], gen)]
        with torch.no_grad():
            t_out = [teacher(v) for v in views[:2]]
        s_out = [student(v) for v in views]
        loss = dino_loss(s_out, t_out, center, cfg["t_student"], cfg["t_teacher"])
        for g in opt.param_groups:
            g["lr"] = _schedule(step, steps, warmup, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        m = 1 - (1 - cfg["teacher_momentum"]) * (math.cos(math.pi * step / steps) + 1) / 2
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            batch_center = torch.cat(t_out).mean(0)
            center.mul_(cfg["center_momentum"]).add_(batch_center, alpha=1 - cfg["center_momentum"])
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(f"[dino] {model_name} seed {seed}: step {step + 1}/{steps} loss {loss.item():.4f}")
    teacher.eval()
    return teacher, preprocess, time.time() - t0


# ----------------------------------------------------------------------------------- evaluation
def labelled_images(n: int, split: str, heldout: bool = False, corrupt: bool = False):
    """``n`` single-object images and their (colour, shape) labels, deterministic in (split, index)."""
    pairs = sorted(S.HELD_OUT_PAIRS)
    imgs, labels = [], []
    for i in range(n):
        rng = random.Random(f"dino-eval-v{S.VERSION}-{split}-{i}")
        if heldout:
            c, s = pairs[i % len(pairs)]
            obj = S.Obj(c, rng.choice(S.SIZES), s)
        else:
            obj = S.random_scene(rng, 1).objs[0]
        imgs.append(S.render(S.Scene((obj,), None), rng, corrupt=corrupt))
        labels.append((obj.color, obj.shape))
    return imgs, labels


def knn_predict(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, n_classes: int,
                k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-NN (DINO's): cosine similarities, the k nearest vote with weight exp(sim / T)."""
    sim = F.normalize(query, dim=-1) @ F.normalize(bank, dim=-1).T
    top, idx = sim.topk(min(k, bank.shape[0]), dim=-1)
    votes = torch.zeros(query.shape[0], n_classes)
    votes.scatter_add_(1, bank_y[idx], (top / temperature).exp())
    return votes.argmax(-1)


def linear_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 100):
    """Multinomial logistic regression on standardised features (L-BFGS); returns a predict function."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda q: (((q - mu) / sd) @ w.detach() + b.detach()).argmax(-1)


@torch.no_grad()
def _embed(model: Dino, preprocess, imgs) -> torch.Tensor:
    x = torch.stack([preprocess(i) for i in imgs])
    return torch.cat([model.embed(x[i:i + 256]) for i in range(0, len(x), 256)])


def evaluate(model: Dino, preprocess, cfg: Dict = DEFAULTS) -> Dict[str, float]:
    """k-NN and linear-probe accuracies (``knn_<task>``, ``probe_<task>``, ``robust_*``) on the labels."""
    seen = [(c, s) for c in S.COLORS for s in S.SHAPES if (c, s) not in S.HELD_OUT_PAIRS]
    enc = {"color": {c: i for i, c in enumerate(S.COLORS)}, "shape": {s: i for i, s in enumerate(S.SHAPES)},
           "pair": {p: i for i, p in enumerate(seen)}}
    key = {"color": lambda l: l[0], "shape": lambda l: l[1], "pair": lambda l: l}

    def ys(labels, task):
        return torch.tensor([enc[task][key[task](l)] for l in labels])

    bank_imgs, bank_l = labelled_images(cfg["n_bank"], "bank")
    bank = _embed(model, preprocess, bank_imgs)
    tests = {"": labelled_images(cfg["n_test"], "test"), "robust_": labelled_images(cfg["n_test"], "robust", corrupt=True)}
    held_imgs, held_l = labelled_images(cfg["n_test"], "heldout", heldout=True)
    held = _embed(model, preprocess, held_imgs)
    out: Dict[str, float] = {}
    for method in ("knn", "probe"):
        predictors = {}
        for task in ("color", "shape", "pair"):
            y = ys(bank_l, task)
            n = len(enc[task])
            if method == "knn":
                predictors[task] = lambda q, y=y, n=n: knn_predict(bank, y, q, n, cfg["knn_k"])
            else:
                predictors[task] = linear_probe(bank, y, n)
        for prefix, (imgs, labels) in tests.items():
            q = _embed(model, preprocess, imgs)
            for task in ("color", "shape", "pair"):
                out[f"{prefix}{method}_{task}"] = (predictors[task](q) == ys(labels, task)).float().mean().item()
        both = (predictors["color"](held) == ys(held_l, "color")) & (predictors["shape"](held) == ys(held_l, "shape"))
        out[f"{method}_heldout_pair"] = both.float().mean().item()
    out["knn_mean"] = sum(out[f"knn_{t}"] for t in TASKS) / len(TASKS)
    out["probe_mean"] = sum(out[f"probe_{t}"] for t in TASKS) / len(TASKS)
    return out
