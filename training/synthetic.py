"""Built-in default data: a synthetic compositional image-text set, written as webdataset shards.

Images hold one to three coloured shapes in spatial relations, captioned like
"a red circle left of a blue square". The evaluation split adds, for every image with two or
more shapes, an attribute-swapped negative caption ("a blue circle left of a red square"), and
for single-shape images the colour and shape labels used by zero-shot classification.

Generation is deterministic in (seed, split, index), done once, and published atomically: the
shards are written into a temporary folder that is renamed into place when complete.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tarfile
import time
from typing import Dict, List, Tuple

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 50), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
RELATIONS = ("left of", "right of", "above", "below")
VERSION = 1
IMAGE_SIZE = 64
SHARD_SIZE = 1000

# Zero-shot classification on the synthetic set: class names and prompt templates.
COLOR_TEMPLATES = (lambda c: f"{'an' if c[0] in 'aeiou' else 'a'} {c} shape.",
                   lambda c: f"{'an' if c[0] in 'aeiou' else 'a'} {c} object.")
SHAPE_TEMPLATES = (lambda s: f"a {s}.", lambda s: f"a coloured {s}.")


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    else:
        raise ValueError(shape)


def _phrase(obj) -> str:
    article = "an" if obj[0][0] in "aeiou" else "a"
    return f"{article} {obj[0]} {obj[1]}"


def make_sample(rng: random.Random, n_objects: int, size: int = IMAGE_SIZE):
    """One image (PIL) and its metadata: caption, swapped negative (n >= 2), colours, shapes."""
    from PIL import Image, ImageDraw

    colors = rng.sample(list(COLORS), n_objects)  # distinct colours: a colour swap is a real change
    shapes = [rng.choice(SHAPES) for _ in range(n_objects)]
    objs = list(zip(colors, shapes))
    bg = rng.randint(20, 70)
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    jit = lambda a: rng.uniform(-a, a) * size  # noqa: E731
    if n_objects == 1:
        r = rng.uniform(0.18, 0.3) * size
        centres = [(size / 2 + jit(0.12), size / 2 + jit(0.12))]
        caption = _phrase(objs[0])
        relation = None
    elif n_objects == 2:
        relation = rng.choice(RELATIONS)
        r = rng.uniform(0.13, 0.19) * size
        a, b = (0.27 * size, 0.73 * size)
        c = size / 2
        first, second = {"left of": ((a, c), (b, c)), "right of": ((b, c), (a, c)),
                         "above": ((c, a), (c, b)), "below": ((c, b), (c, a))}[relation]
        centres = [(first[0] + jit(0.05), first[1] + jit(0.1)), (second[0] + jit(0.05), second[1] + jit(0.1))]
        if relation in ("above", "below"):
            centres = [(first[0] + jit(0.1), first[1] + jit(0.05)), (second[0] + jit(0.1), second[1] + jit(0.05))]
        caption = f"{_phrase(objs[0])} {relation} {_phrase(objs[1])}"
    else:
        relation = "left of"
        r = rng.uniform(0.1, 0.13) * size
        xs = (0.18 * size, 0.5 * size, 0.82 * size)
        centres = [(x + jit(0.03), size / 2 + jit(0.2)) for x in xs]
        caption = f"{_phrase(objs[0])} left of {_phrase(objs[1])} left of {_phrase(objs[2])}"
    for (color, shape), (cx, cy) in zip(objs, centres):
        _draw_shape(draw, shape, cx, cy, r, COLORS[color])
    meta = {"caption": caption, "colors": colors, "shapes": shapes, "relation": relation, "n": n_objects}
    if n_objects >= 2:
        swapped = [(colors[1], shapes[0]), (colors[0], shapes[1])] + objs[2:]
        if n_objects == 2:
            meta["neg_caption"] = f"{_phrase(swapped[0])} {relation} {_phrase(swapped[1])}"
        else:
            meta["neg_caption"] = (f"{_phrase(swapped[0])} left of {_phrase(swapped[1])} "
                                   f"left of {_phrase(swapped[2])}")
    else:
        meta["color"] = colors[0]
        meta["shape"] = shapes[0]
    return img, meta


def _n_objects(rng: random.Random, split: str) -> int:
    u = rng.random()
    if split == "val":
        return 1 if u < 0.4 else (2 if u < 0.85 else 3)
    return 1 if u < 0.3 else (2 if u < 0.8 else 3)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_split(folder: str, split: str, num_samples: int, seed: int, shard_size: int = SHARD_SIZE) -> List[str]:
    """Write ``split-{000000..}.tar`` shards with ``png``, ``txt`` and ``json`` fields."""
    paths = []
    n_shards = max(1, math.ceil(num_samples / shard_size))
    for s in range(n_shards):
        path = os.path.join(folder, f"{split}-{s:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(num_samples, (s + 1) * shard_size)):
                rng = random.Random(f"sparo-synthetic-{VERSION}-{seed}-{split}-{i}")
                img, meta = make_sample(rng, _n_objects(rng, split))
                buf = io.BytesIO()
                img.save(buf, format="PNG", optimize=False, compress_level=1)
                key = f"{split}{i:08d}"
                _add(tar, key + ".png", buf.getvalue())
                _add(tar, key + ".txt", meta["caption"].encode())
                _add(tar, key + ".json", json.dumps(meta).encode())
        paths.append(path)
    return paths


def dataset_dir(cache_dir: str, train_samples: int, val_samples: int, seed: int = 0,
                shard_size: int = SHARD_SIZE) -> str:
    return os.path.join(os.path.abspath(cache_dir),
                        f"synthetic-v{VERSION}-s{seed}-{train_samples}-{val_samples}-{shard_size}")


def shard_pattern(folder: str, split: str, num_samples: int, shard_size: int = SHARD_SIZE) -> str:
    n = max(1, math.ceil(num_samples / shard_size))
    return os.path.join(folder, f"{split}-{{000000..{n - 1:06d}}}.tar") if n > 1 else \
        os.path.join(folder, f"{split}-000000.tar")


def ensure_synthetic(cache_dir: str, train_samples: int, val_samples: int, seed: int = 0, log=print,
                     shard_size: int = SHARD_SIZE) -> dict:
    """Generate the set once (atomically) and return ``{train, val, train_num_samples, val_num_samples}``."""
    folder = dataset_dir(cache_dir, train_samples, val_samples, seed, shard_size)
    if not os.path.exists(os.path.join(folder, "sizes.json")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = f"{folder}.tmp-{os.getpid()}-{time.time_ns()}"
        os.makedirs(tmp)
        t0 = time.time()
        log(f"generating the synthetic data set ({train_samples} train + {val_samples} eval samples) in {folder}")
        try:
            train = write_split(tmp, "train", train_samples, seed, shard_size)
            val = write_split(tmp, "val", val_samples, seed, shard_size)
            sizes = {os.path.basename(p): min(shard_size, train_samples - i * shard_size) for i, p in enumerate(train)}
            sizes.update({os.path.basename(p): min(shard_size, val_samples - i * shard_size)
                          for i, p in enumerate(val)})
            with open(os.path.join(tmp, "sizes.json"), "w") as f:
                json.dump(sizes, f)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not os.path.exists(os.path.join(folder, "sizes.json")):  # not someone else's finished copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"synthetic data set ready in {time.time() - t0:.1f}s")
    return {"train": shard_pattern(folder, "train", train_samples, shard_size),
            "val": shard_pattern(folder, "val", val_samples, shard_size),
            "train_num_samples": train_samples, "val_num_samples": val_samples, "folder": folder}
