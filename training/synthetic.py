"""Built-in default data: a synthetic compositional image-text set, written as webdataset shards.

Version 2 of the world. Images hold one to three shapes, each with a colour (6), a size (small
or large) and a shape (4), in spatial relations, captioned like "a small red circle left of a
large blue square". Training captions name each object's size with probability 1/2 (so that a
caption with a size added is a meaningful test: see ``compbench``'s add-attribute category).

Some colour-shape pairs (``HELD_OUT_PAIRS``, e.g. red triangles) never occur in the training or
evaluation splits written here: ``compbench`` tests them as a held-out compositional split.

The evaluation split adds, for every image with two or more shapes, an attribute-swapped negative
caption ("a small blue circle left of a large red square"), and for single-shape images the colour
and shape labels used by zero-shot classification.

Generation is deterministic in (version, seed, split, index), done once, and published
atomically: the shards are written into a temporary folder that is renamed into place when complete.
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
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 50), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
# radius as a fraction of the image side; the two ranges are far apart so that size is unambiguous
SIZE_RADIUS = {"small": (0.07, 0.095), "large": (0.13, 0.16)}
RELATIONS = ("left of", "right of", "above", "below")
# colour-shape pairs never drawn in the written splits (one per shape, each with its own colour)
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")})
VERSION = 2
IMAGE_SIZE = 64
SHARD_SIZE = 1000

# Zero-shot classification on the synthetic set: class names and prompt templates.
COLOR_TEMPLATES = (lambda c: f"{'an' if c[0] in 'aeiou' else 'a'} {c} shape.",
                   lambda c: f"{'an' if c[0] in 'aeiou' else 'a'} {c} object.")
SHAPE_TEMPLATES = (lambda s: f"a {s}.", lambda s: f"a coloured {s}.")


class Obj(NamedTuple):
    color: str
    size: str
    shape: str


class Scene(NamedTuple):
    """Objects in caption order; ``relation`` between consecutive objects (None for one object)."""
    objs: Tuple[Obj, ...]
    relation: Optional[str]


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


def phrase(obj: Obj, with_size: bool = True) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def caption(scene: Scene, with_size: Optional[Sequence[bool]] = None) -> str:
    """"a small red circle left of a large blue square"; ``with_size[i]`` False drops object i's size."""
    shown = [True] * len(scene.objs) if with_size is None else list(with_size)
    parts = [phrase(o, s) for o, s in zip(scene.objs, shown)]
    return f" {scene.relation} ".join(parts) if scene.relation else parts[0]


def random_scene(rng: random.Random, n_objects: int, exclude=HELD_OUT_PAIRS, include: Optional[Obj] = None,
                 relation: Optional[str] = None) -> Scene:
    """Distinct colours (so a colour swap is a real change); no object in ``exclude`` (colour, shape)
    pairs; ``include`` (if given) is one of the objects."""
    for _ in range(1000):
        colors = rng.sample(list(COLORS), n_objects)
        objs = [Obj(c, rng.choice(SIZES), rng.choice(SHAPES)) for c in colors]
        if include is not None:
            objs[rng.randrange(n_objects)] = include
            if len({o.color for o in objs}) < n_objects:
                continue
        if not any((o.color, o.shape) in exclude and o != include for o in objs):
            break
    else:
        raise RuntimeError("could not draw a scene avoiding the excluded pairs")
    if n_objects == 1:
        rel = None
    elif n_objects == 2:
        rel = relation or rng.choice(RELATIONS)
    else:
        rel = "left of"  # three objects: always a left-to-right row
    return Scene(tuple(objs), rel)


def _centres(rng: random.Random, scene: Scene, size: int) -> List[Tuple[float, float]]:
    jit = lambda a: rng.uniform(-a, a) * size  # noqa: E731
    n = len(scene.objs)
    if n == 1:
        return [(size / 2 + jit(0.2), size / 2 + jit(0.2))]
    if n == 2:
        a, b, c = 0.27 * size, 0.73 * size, size / 2
        first, second = {"left of": ((a, c), (b, c)), "right of": ((b, c), (a, c)),
                         "above": ((c, a), (c, b)), "below": ((c, b), (c, a))}[scene.relation]
        if scene.relation in ("above", "below"):
            return [(p[0] + jit(0.12), p[1] + jit(0.04)) for p in (first, second)]
        return [(p[0] + jit(0.04), p[1] + jit(0.12)) for p in (first, second)]
    return [(x * size + jit(0.02), size / 2 + jit(0.2)) for x in (0.18, 0.5, 0.82)]


def _corrupt(img, rng: random.Random):
    """Robustness: grey clutter lines, small unnamed grey blobs and per-pixel noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    s = img.size[0]
    draw = ImageDraw.Draw(img)
    for _ in range(5):
        g = rng.randint(90, 200)
        draw.line([(rng.uniform(0, s), rng.uniform(0, s)), (rng.uniform(0, s), rng.uniform(0, s))],
                  fill=(g, g, g), width=1)
    for _ in range(3):
        g, r = rng.randint(100, 200), rng.uniform(1.5, 3.0)
        cx, cy = rng.uniform(0, s), rng.uniform(0, s)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(g, g, g))
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-30, 31, size=(s, s, 3))
    arr = (np.asarray(img, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def render(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE, corrupt: bool = False):
    """The scene as a PIL image (random background shade, positions and radii within each size class)."""
    from PIL import Image, ImageDraw

    bg = rng.randint(20, 70)
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    for obj, (cx, cy) in zip(scene.objs, _centres(rng, scene, size)):
        _draw_shape(draw, obj.shape, cx, cy, rng.uniform(*SIZE_RADIUS[obj.size]) * size, COLORS[obj.color])
    return _corrupt(img, rng) if corrupt else img


def make_sample(rng: random.Random, n_objects: int, size: int = IMAGE_SIZE, random_sizes_in_caption: bool = False):
    """One image (PIL) and its metadata: caption, swapped negative (n >= 2), colours, shapes, sizes."""
    scene = random_scene(rng, n_objects)
    img = render(scene, rng, size)
    shown = [rng.random() < 0.5 for _ in scene.objs] if random_sizes_in_caption else None
    objs = scene.objs
    meta = {"caption": caption(scene, shown), "colors": [o.color for o in objs], "shapes": [o.shape for o in objs],
            "sizes": [o.size for o in objs], "relation": scene.relation, "n": n_objects}
    if n_objects >= 2:
        swapped = (objs[0]._replace(color=objs[1].color), objs[1]._replace(color=objs[0].color)) + objs[2:]
        meta["neg_caption"] = caption(Scene(swapped, scene.relation), shown)
    else:
        meta["color"] = objs[0].color
        meta["shape"] = objs[0].shape
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
                img, meta = make_sample(rng, _n_objects(rng, split), random_sizes_in_caption=split == "train")
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
