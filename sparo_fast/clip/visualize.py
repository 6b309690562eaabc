"""Slot visualisation for SPARO CLIP models (PIL only).

    python -m sparo_fast.clip.visualize --model ViT-B-16-SPARO --checkpoint epoch_25.pt \\
        --image dog.jpg --text "a dog on a sofa" --top-k 8 --out viz.png

The figure: a header with the input image as the model sees it (after the model's
preprocessing), then one panel per shown slot: its attention over the patch grid as a heat map
on the image (normalised per slot to its largest patch weight; the CLS token's weight, which has
no place on the grid, is written in the label), and, with ``--text``, the slot's attention over
the caption's tokens (start token to end token) as coloured boxes. A colour bar and a legend in
the header give the scale (both maps are normalised per slot: 0 to the slot's largest weight).
Text is set in DejaVu Sans (matplotlib's bundled TrueType font) when matplotlib is installed,
else in PIL's default font. Without ``--checkpoint`` the weights are random and a warning says
so; on success the path of the PNG is printed.

From Python, ``render(model, image, text, out_path)`` writes the same figure for a built model
(e.g. one panel per trained model of an experiment).

Slot order: with ``--text``, by the cosine between the image slot and the text slot (best aligned
first, the concept-selection signal of ``sparo_fast.clip.rank_slots``); without text, by the
slot's peak attention on a patch (the most localised slots first). ``--slots 3,7,1`` shows
exactly those slots in that order.

Errors (missing or unreadable image, unreadable or mismatching checkpoint, unknown model, bad
arguments) print one line on stderr and exit with status 1 (argparse usage errors: 2).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .checkpoint import CheckpointError, load_checkpoint
from .factory import create_model, tokenizer_for
from .slots import check_slots

PAD = 8
FONT_SIZE = 11
LINE_H = 15  # header text lines
LABEL_H = 17  # slot label under each panel
TOKEN_LINE_H = 16
TOKEN_LINES = 4
HEADER_TEXT_W = 380
HEADER_LINES = 5  # title, caption, slot order, heat-map legend, token legend
BAR_W = 200
BAR_H = 10
HEADER_TEXT_H = HEADER_LINES * LINE_H + 4 + BAR_H + LINE_H  # the lines, then the colour bar and its labels
MAX_COLS = 4

# "inferno"-like colour map anchors (position, RGB)
_CMAP = np.array([
    [0.00, 0, 0, 4], [0.25, 87, 16, 110], [0.50, 188, 55, 84], [0.75, 249, 142, 9], [1.00, 252, 255, 164],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB (an inferno-like ramp)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    out = np.stack([np.interp(v, _CMAP[:, 0], _CMAP[:, c]) for c in (1, 2, 3)], axis=-1)
    return out.round().astype(np.uint8)


def figure_size(n_slots: int, with_text: bool, cell: int = 160) -> tuple:
    """(width, height) of the figure for ``n_slots`` panels of ``cell`` pixels."""
    cols = max(1, min(MAX_COLS, n_slots))
    rows = math.ceil(n_slots / cols)
    panel_h = cell + LABEL_H + (TOKEN_LINES * TOKEN_LINE_H if with_text else 0)
    width = max(PAD + cols * (cell + PAD), PAD + cell + PAD + HEADER_TEXT_W)
    height = PAD + header_height(cell) + PAD + rows * (panel_h + PAD)
    return width, height


def header_height(cell: int) -> int:
    """The header holds the input image (cell x cell) and the legend text with the colour bar."""
    return max(cell, HEADER_TEXT_H)


def colour_bar_box(cell: int) -> tuple:
    """(x0, y0, x1, y1) of the colour bar in the figure, inclusive."""
    x0 = PAD + cell + PAD
    y0 = PAD + HEADER_LINES * LINE_H + 4
    return x0, y0, x0 + BAR_W - 1, y0 + BAR_H - 1


def header_lines(title: str, caption: Optional[str], score_name: str) -> List[str]:
    """The header's text lines: title, caption, slot order and the legend of the two maps."""
    order = "image-text slot cosine" if score_name == "cos" else "peak patch attention"
    return [
        title,
        f"text: \"{caption}\"" if caption is not None else "text: none (slots ordered by attention)",
        f"slots ordered by {order} (value in each label)",
        "heat map: the slot's attention over the image patches",
        "token boxes: the slot's attention over the caption tokens" if caption is not None else "",
    ]


@dataclass
class SlotView:
    slot: int
    score: float
    cls_weight: float
    patch_attn: np.ndarray  # [gh, gw]
    text_attn: Optional[np.ndarray]  # [n_tokens] (start..end token) or None


@functools.lru_cache(maxsize=None)
def _font(size: int = FONT_SIZE):
    """DejaVu Sans (bundled with matplotlib) at ``size`` px; PIL's default font without matplotlib.

    PIL's own default font sets spaces so narrow at small sizes that words run together
    ("left ofa blue square").
    """
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False)
        return ImageFont.truetype(path, size)
    except (ImportError, ValueError, OSError):
        try:
            return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
        except TypeError:
            return ImageFont.load_default()


def _token_strings(tokenizer, ids: Sequence[int]) -> List[str]:
    out = []
    for i in ids:
        s = tokenizer.decoder.get(int(i), "?")
        s = {"<start_of_text>": "<sot>", "<end_of_text>": "<eot>"}.get(s, s)
        out.append(s.replace("</w>", ""))
    return out


def _display_image(pixels: torch.Tensor, preprocess_cfg) -> "Image.Image":
    mean = torch.tensor(preprocess_cfg.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
    std = torch.tensor(preprocess_cfg.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
    x = (pixels.float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@torch.no_grad()
def slot_views(model, pixels: torch.Tensor, tokens: Optional[torch.Tensor] = None, top_k: int = 8,
               slots: Optional[Sequence[int]] = None) -> List[SlotView]:
    """Per-slot attention maps (and scores) of one preprocessed image [3, H, W] (and caption [ctx])."""
    if not getattr(model, "use_sparo", False):
        raise ValueError("the model has no SPARO slots (it is a baseline CLIP)")
    L = model.L
    if slots is not None:
        slots = list(check_slots(slots, L))
    elif not 1 <= top_k <= L:
        raise ValueError(f"--top-k must lie in [1, {L}] (the model has L={L} slots), got {top_k}")
    param = next(model.parameters())
    x = pixels[None].to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    img_slots, img_attn = model.encode_image(x, return_sparo=True, return_attn=True)
    img_attn = img_attn[0].float().cpu()
    gh, gw = model.visual.grid_size
    txt_attn = None
    if tokens is not None:
        t = tokens[None].to(param.device)
        txt_slots, txt_attn = model.encode_text(t, return_sparo=True, return_attn=True)
        eos = int(tokens.argmax())
        txt_attn = txt_attn[0, :, :eos + 1].float().cpu()
        scores = torch.nn.functional.cosine_similarity(img_slots[0].double(), txt_slots[0].double(), dim=-1).cpu()
    else:
        scores = img_attn[:, 1:].max(dim=-1).values.double()
    if slots is None:
        slots = torch.sort(scores, descending=True, stable=True).indices[:top_k].tolist()
    views = []
    for s in slots:
        views.append(SlotView(
            slot=int(s), score=float(scores[s]), cls_weight=float(img_attn[s, 0]),
            patch_attn=img_attn[s, 1:].reshape(gh, gw).numpy(),
            text_attn=None if txt_attn is None else txt_attn[s].numpy()))
    return views


def compose(image: "Image.Image", views: Sequence[SlotView], *, token_strings: Optional[List[str]] = None,
            title: str = "", caption: Optional[str] = None, score_name: str = "cos", cell: int = 160):
    """Compose the figure (a PIL image of ``figure_size(len(views), token_strings is not None, cell)``)."""
    with_text = token_strings is not None
    W, H = figure_size(len(views), with_text, cell)
    fig = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font = _font()
    base = image.convert("RGB").resize((cell, cell), Image.BICUBIC)
    fig.paste(base, (PAD, PAD))
    _draw_legend(draw, font, header_lines(title, caption, score_name), cell, W)

    cols = max(1, min(MAX_COLS, len(views)))
    panel_h = cell + LABEL_H + (TOKEN_LINES * TOKEN_LINE_H if with_text else 0)
    base_arr = np.asarray(base, dtype=np.float64)
    for i, v in enumerate(views):
        x0 = PAD + (i % cols) * (cell + PAD)
        y0 = PAD + header_height(cell) + PAD + (i // cols) * (panel_h + PAD)
        a = v.patch_attn / max(float(v.patch_attn.max()), 1e-12)
        heat_small = Image.fromarray((a * 255).round().astype(np.uint8))
        heat = np.asarray(heat_small.resize((cell, cell), Image.BILINEAR), dtype=np.float64) / 255.0
        rgb = colormap(heat).astype(np.float64)
        alpha = 0.25 + 0.5 * heat[..., None]
        over = (base_arr * (1 - alpha) + rgb * alpha).round().clip(0, 255).astype(np.uint8)
        fig.paste(Image.fromarray(over), (x0, y0))
        draw.text((x0, y0 + cell + 2), _panel_label(draw, font, v, score_name, cell), fill=(0, 0, 0), font=font)
        if with_text:
            _draw_tokens(draw, font, token_strings, v.text_attn, x0, y0 + cell + LABEL_H, cell)
    return fig


def _draw_legend(draw, font, lines: List[str], cell: int, width: int) -> None:
    """Header text, then the colour bar shared by the heat maps and the token boxes."""
    tx = PAD + cell + PAD
    for i, line in enumerate(lines):
        draw.text((tx, PAD + i * LINE_H), _clip_text(draw, line, font, width - tx - PAD), fill=(0, 0, 0), font=font)
    x0, y0, x1, y1 = colour_bar_box(cell)
    ramp = colormap(np.linspace(0.0, 1.0, x1 - x0 + 1))
    for dx, c in enumerate(ramp):
        draw.line([(x0 + dx, y0), (x0 + dx, y1)], fill=tuple(int(v) for v in c))
    draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0))
    ly = y1 + 2
    draw.text((x0, ly), "0", fill=(0, 0, 0), font=font)
    right = "slot max"
    draw.text((x1 + 1 - draw.textlength(right, font=font), ly), right, fill=(0, 0, 0), font=font)
    note = "attention, per slot"
    draw.text((x1 + 8, y0 - 3), _clip_text(draw, note, font, max(0, width - x1 - 8 - PAD)), fill=(0, 0, 0), font=font)


def _panel_label(draw, font, v: SlotView, score_name: str, width: int) -> str:
    """The longest label that fits: slot, score and CLS weight; then slot and score."""
    for label in (f"slot {v.slot}  {score_name} {v.score:+.2f}  CLS {v.cls_weight:.2f}",
                  f"slot {v.slot}  {score_name} {v.score:+.2f}", f"slot {v.slot}  {v.score:+.2f}"):
        if draw.textlength(label, font=font) <= width:
            return label
    return _clip_text(draw, label, font, width)


def _clip_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _draw_tokens(draw, font, tokens: List[str], attn: np.ndarray, x0: int, y0: int, width: int) -> None:
    a = attn / max(float(attn.max()), 1e-12)
    colours = colormap(a)
    x, line = x0, 0
    for tok, w, c in zip(tokens, a, colours):
        tw = int(draw.textlength(tok, font=font)) + 4
        if x + tw > x0 + width and x > x0:
            line += 1
            x = x0
        if line >= TOKEN_LINES:
            break
        y = y0 + line * TOKEN_LINE_H
        draw.rectangle([x, y, min(x + tw, x0 + width) - 1, y + TOKEN_LINE_H - 2], fill=tuple(int(v) for v in c))
        draw.text((x + 2, y), tok, fill=(0, 0, 0) if w > 0.5 else (255, 255, 255), font=font)
        x += tw + 2


def visualize(model, image, text: Optional[str] = None, *, top_k: int = 8, slots: Optional[Sequence[int]] = None,
              preprocess=None, tokenizer=None, cell: int = 160, title: str = ""):
    """The slot figure for a PIL ``image`` (and optional caption) as a PIL image."""
    pp_cfg = getattr(model.visual, "preprocess_cfg", None) or {"size": model.visual.image_size}
    if preprocess is None:
        preprocess = image_transform_v2(PreprocessCfg(**pp_cfg), is_train=False)
    pixels = preprocess(image.convert("RGB"))
    tokens = token_strings = None
    if text is not None:
        tokenizer = tokenizer or tokenizer_for(model)
        tokens = tokenizer([text])[0]
        token_strings = _token_strings(tokenizer, tokens[:int(tokens.argmax()) + 1].tolist())
    was_training = model.training
    model.eval()
    try:
        views = slot_views(model, pixels, tokens, top_k=top_k, slots=slots)
    finally:
        model.train(was_training)
    return compose(_display_image(pixels, pp_cfg), views, token_strings=token_strings, title=title,
                   caption=text, score_name="cos" if text is not None else "peak", cell=cell)


def render(model, image, text: Optional[str], out_path: Union[str, os.PathLike], *, top_k: int = 8,
           slots: Optional[Sequence[int]] = None, title: str = "", cell: int = 160, preprocess=None,
           tokenizer=None) -> Path:
    """Write the slot figure of ``model`` (a SPARO model from ``sparo_fast.clip``) for ``image``
    (a PIL image or an image file) and the optional caption ``text`` to the PNG ``out_path``.

    Returns the PNG's absolute path. Raises ValueError for a model without slots or bad
    ``top_k``/``slots``. The model's weights are used as they are (load a checkpoint first).
    """
    if not getattr(model, "use_sparo", False):
        raise ValueError(f"{type(model).__name__} has no SPARO slots to show (it is a baseline CLIP)")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    fig = visualize(model, image, text, top_k=top_k, slots=slots, preprocess=preprocess, tokenizer=tokenizer,
                    cell=cell, title=title)
    out = Path(out_path).resolve()
    fig.save(out, format="PNG")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparo_fast.clip.visualize",
                                description="Visualise the attention of a SPARO CLIP model's slots.")
    p.add_argument("--model", required=True, help="model name (sparo_fast.clip.list_models()) or a JSON config file")
    p.add_argument("--checkpoint", help="trainer checkpoint or state dict to load (strict); without it the "
                   "weights are random (a warning says so)")
    p.add_argument("--override", help="JSON dict of model config overrides (nested dicts merge)")
    p.add_argument("--image", required=True, help="input image file")
    p.add_argument("--text", help="caption: orders slots by image-text alignment and shows text attention")
    p.add_argument("--top-k", type=int, default=8, help="number of slots to show (default 8)")
    p.add_argument("--slots", help="comma-separated slot indices to show instead of the top-k")
    p.add_argument("--cell", type=int, default=160, help="panel size in pixels (default 160)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", required=True, help="output PNG path")
    return p


class _Fail(Exception):
    pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except _Fail as e:
        print(f"sparo_fast.clip.visualize: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    if args.cell < 32:
        raise _Fail(f"--cell must be at least 32 pixels, got {args.cell}")
    slots = None
    if args.slots:
        try:
            slots = [int(s) for s in args.slots.split(",") if s.strip()]
        except ValueError:
            raise _Fail(f"--slots must be comma-separated integers, got {args.slots!r}") from None
    if not os.path.isfile(args.image):
        raise _Fail(f"image {args.image!r} not found")
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise _Fail(f"cannot read image {args.image!r}: {e}") from None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise _Fail(f"output directory {out_dir!r} does not exist")

    name_or_config = args.model
    if args.model.endswith(".json"):
        try:
            with open(args.model, "r", encoding="utf-8") as f:
                name_or_config = json.load(f)
        except (OSError, ValueError) as e:
            raise _Fail(f"cannot read model config {args.model!r}: {e}") from None
    try:
        override = json.loads(args.override) if args.override else None
    except ValueError as e:
        raise _Fail(f"--override is not valid JSON: {e}") from None
    try:
        model = create_model(name_or_config, device="cpu", override=override)
    except (ValueError, TypeError) as e:
        raise _Fail(str(e)) from None
    if not getattr(model, "use_sparo", False):
        raise _Fail(f"model {args.model!r} has no SPARO slots (it is a baseline CLIP)")
    if args.checkpoint:
        try:
            load_checkpoint(model, args.checkpoint)
        except CheckpointError as e:
            raise _Fail(str(e)) from None
    try:
        model.to(torch.device(args.device))
    except (RuntimeError, ValueError) as e:
        raise _Fail(f"cannot use device {args.device!r}: {e}") from None
    title = f"{args.model}" + (f"  ({os.path.basename(args.checkpoint)})" if args.checkpoint else "  (random init)")
    try:
        fig = visualize(model, image, args.text, top_k=args.top_k, slots=slots, cell=args.cell, title=title)
    except (ValueError, TypeError) as e:
        raise _Fail(str(e)) from None
    out = os.path.abspath(args.out)
    try:
        fig.save(out, format="PNG")
    except OSError as e:
        raise _Fail(f"cannot write {args.out!r}: {e}") from None
    if not args.checkpoint:
        print("sparo_fast.clip.visualize: warning: no --checkpoint given: the weights are random, so the maps "
              "show no learned attention", file=sys.stderr)
    print(f"sparo_fast.clip.visualize: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
