"""``python -m sparo_fast.clip.visualize``: writes a PNG of the expected size, fails cleanly on bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")
from open_clip.transform import PreprocessCfg, image_transform_v2  # noqa: E402

from accuracy import assert_close  # noqa: E402
from sparo_fast.clip import visualize as viz  # noqa: E402
from sparo_fast.clip import create_model, get_tokenizer  # noqa: E402

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("viz")
    arr = np.zeros((90, 120, 3), dtype=np.uint8)
    arr[...] = (40, 120, 200)
    arr[10:60, 10:60] = (230, 20, 20)
    arr[40:85, 70:110] = (20, 200, 40)
    p = d / "in.png"
    Image.fromarray(arr).save(p)
    return p


@pytest.fixture(scope="module")
def golden_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    g = torch.load(DATA / "clip_tiny.pt", weights_only=False)
    cfg = d / "tiny.json"
    cfg.write_text(json.dumps(g["config"]))
    ckpt = d / "tiny.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in g["state_dict"].items()}}, ckpt)
    return cfg, ckpt


def test_figure_size_formula():
    # header: the image or the legend (5 lines, the colour bar and its labels), whichever is taller
    head = 5 * 15 + 4 + 10 + 15
    assert viz.header_height(64) == head and viz.header_height(160) == 160
    # 8 panels of 64 px with text: 4 columns, 2 rows; the header text sets the width
    assert viz.figure_size(8, True, 64) == (8 + 64 + 8 + 380, 8 + head + 8 + 2 * (64 + 17 + 4 * 16 + 8))
    assert viz.figure_size(3, False, 160) == (8 + 160 + 8 + 380, 8 + 160 + 8 + (160 + 17 + 8))
    assert viz.figure_size(8, False, 160) == (8 + 4 * 168, 8 + 160 + 8 + 2 * (160 + 17 + 8))


def test_font_keeps_word_spaces():
    """PIL's default font set 'left of a' as 'left ofa'; matplotlib's DejaVu Sans does not."""
    pytest.importorskip("matplotlib")  # in the clip extra; without it the visualiser falls back to PIL's font
    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    font = viz._font()
    gap = draw.textlength("a b", font=font) - draw.textlength("ab", font=font)
    assert gap >= 0.25 * font.size, gap  # a quarter em at least (DejaVu Sans: 0.32 em; PIL's default: 0.2 em)
    assert font.getname()[0] == "DejaVu Sans"


def test_legend_and_colour_bar(image_path):
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-SPARO").eval()
    fig = viz.visualize(model, Image.open(image_path), "a red circle", top_k=2, cell=96, title="t")
    x0, y0, x1, y1 = viz.colour_bar_box(96)
    px = np.asarray(fig)
    # the bar runs from the colour of 0 to the colour of the slot maximum, left to right
    np.testing.assert_array_equal(px[(y0 + y1) // 2, x0], viz.colormap(np.array(0.0)))
    np.testing.assert_array_equal(px[(y0 + y1) // 2, x1], viz.colormap(np.array(1.0)))
    lum = px[(y0 + y1) // 2, x0:x1 + 1].astype(float).sum(-1)
    assert lum[-1] > lum[len(lum) // 2] > lum[0]
    with_text = viz.header_lines("t", "a red circle", "cos")
    assert with_text[1] == 'text: "a red circle"' and "token boxes" in with_text[4] and "cosine" in with_text[2]
    assert "token boxes" not in " ".join(viz.header_lines("t", None, "peak"))


def test_render_api(tmp_path, image_path):
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-SPARO")
    out = viz.render(model, str(image_path), "a red circle above a blue square", tmp_path / "a.png", top_k=3,
                     title="SPARO")
    assert out == (tmp_path / "a.png").resolve()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == viz.figure_size(3, True, 160)
    out = viz.render(model, Image.open(image_path), None, tmp_path / "b.png", slots=[4, 1], cell=64)
    with Image.open(out) as im:
        assert im.size == viz.figure_size(2, False, 64)
    with pytest.raises(ValueError, match="no SPARO slots"):
        viz.render(create_model("ViT-Tiny-GAP"), str(image_path), None, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_cli_writes_png_subprocess(tmp_path, image_path, golden_files):
    cfg, ckpt = golden_files
    out = tmp_path / "viz.png"
    r = subprocess.run(
        [sys.executable, "-m", "sparo_fast.clip.visualize", "--model", str(cfg), "--checkpoint", str(ckpt),
         "--image", str(image_path), "--text", "a red circle above a blue square", "--top-k", "6",
         "--cell", "96", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"sparo_fast.clip.visualize: wrote {out}" and "warning" not in r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == viz.figure_size(6, True, 96)


def test_cli_without_text_in_process(tmp_path, image_path, capsys, monkeypatch):
    out = tmp_path / "viz.png"
    monkeypatch.chdir(tmp_path)
    assert viz.main(["--model", "ViT-Tiny-SPARO", "--image", str(image_path), "--top-k", "3",
                     "--out", "viz.png"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == f"sparo_fast.clip.visualize: wrote {out}"  # the absolute path
    assert cap.err.strip().splitlines() == ["sparo_fast.clip.visualize: warning: no --checkpoint given: the weights "
                                            "are random, so the maps show no learned attention"]
    with Image.open(out) as im:
        assert im.size == viz.figure_size(3, False, 160)


def test_slot_order_and_explicit_slots(image_path):
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-SPARO").eval()
    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(
        Image.open(image_path).convert("RGB"))
    tokens = get_tokenizer("ViT-Tiny-SPARO")(["a red circle"])[0]
    views = viz.slot_views(model, pixels, tokens, top_k=16)
    scores = [v.score for v in views]
    assert scores == sorted(scores, reverse=True) and len(views) == 16
    with torch.no_grad():
        a = model.encode_image(pixels[None], return_sparo=True)
        b = model.encode_text(tokens[None], return_sparo=True)
    cos = torch.nn.functional.cosine_similarity(a[0], b[0], dim=-1)
    assert views[0].slot == int(cos.argmax())
    v = views[0]
    assert v.patch_attn.shape == (8, 8) and v.text_attn.shape == (int(tokens.argmax()) + 1,)
    assert abs(v.patch_attn.sum() + v.cls_weight - 1) < 1e-5
    # a softmax over CLS and the 64 patches sums to 1 up to float32 rounding (accuracy.py's floor)
    total = torch.as_tensor(float(v.patch_attn.sum()) + float(v.cls_weight), dtype=torch.float64)
    assert_close("attention sum", total, torch.tensor(1.0, dtype=torch.float64), dtype=torch.float32,
                 K=v.patch_attn.size + 1, seed="torch.manual_seed(0)")
    chosen = viz.slot_views(model, pixels, None, slots=[5, 2])
    assert [c.slot for c in chosen] == [5, 2] and chosen[0].text_attn is None


def _fails(capsys, argv, pattern):
    code = viz.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("sparo_fast.clip.visualize: error:"), err
    assert pattern in err, err


def test_cli_errors(tmp_path, capsys, image_path):
    out = str(tmp_path / "o.png")
    img = str(image_path)
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", str(tmp_path / "missing.png"), "--out", out], "not found")
    bad_img = tmp_path / "bad.png"
    bad_img.write_bytes(b"not an image")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", str(bad_img), "--out", out], "cannot read image")
    _fails(capsys, ["--model", "ViT-Nope", "--image", img, "--out", out], "unknown model")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"garbage")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--checkpoint", str(bad_ckpt), "--out", out],
           "not a PyTorch checkpoint")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--checkpoint", str(tmp_path / "nope.pt"),
                    "--out", out], "does not exist")
    other = tmp_path / "other.pt"
    torch.save(create_model("ViT-Tiny").state_dict(), other)
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--checkpoint", str(other), "--out", out],
           "does not fit the model")
    _fails(capsys, ["--model", "ViT-Tiny", "--image", img, "--out", out], "no SPARO slots")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--top-k", "17", "--out", out], "--top-k")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--slots", "1,1", "--out", out], "duplicate")
    _fails(capsys, ["--model", "ViT-Tiny-SPARO", "--image", img, "--out", str(tmp_path / "no" / "o.png")],
           "does not exist")
    assert not os.path.exists(out)


def test_cli_error_subprocess(tmp_path, image_path):
    r = subprocess.run([sys.executable, "-m", "sparo_fast.clip.visualize", "--model", "ViT-Tiny-SPARO", "--image",
                        str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"sparo_fast.clip.visualize: error: image '{tmp_path / 'missing.png'}' not found"]
