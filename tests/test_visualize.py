"""``python -m sparo_fast.visualize``: writes a PNG of the expected size, fails cleanly on bad input."""
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

from sparo_fast import visualize as viz  # noqa: E402
from sparo_fast.clip import create_model  # noqa: E402

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
    # 8 panels of 64 px with text: 4 columns, 2 rows; the header text sets the width
    assert viz.figure_size(8, True, 64) == (440, 8 + 64 + 8 + 2 * (64 + 16 + 4 * 14 + 8))
    assert viz.figure_size(3, False, 160) == (8 + 160 + 8 + 360, 8 + 160 + 8 + (160 + 16 + 8))
    assert viz.figure_size(8, False, 160) == (8 + 4 * 168, 8 + 160 + 8 + 2 * (160 + 16 + 8))


def test_cli_writes_png_subprocess(tmp_path, image_path, golden_files):
    cfg, ckpt = golden_files
    out = tmp_path / "viz.png"
    r = subprocess.run(
        [sys.executable, "-m", "sparo_fast.visualize", "--model", str(cfg), "--checkpoint", str(ckpt),
         "--image", str(image_path), "--text", "a red circle above a blue square", "--top-k", "6",
         "--cell", "96", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == viz.figure_size(6, True, 96)


def test_cli_without_text_in_process(tmp_path, image_path):
    out = tmp_path / "viz.png"
    assert viz.main(["--model", "ViT-Tiny-SPARO", "--image", str(image_path), "--top-k", "3",
                     "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == viz.figure_size(3, False, 160)


def test_slot_order_and_explicit_slots(image_path):
    torch.manual_seed(0)
    model = create_model("ViT-Tiny-SPARO").eval()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(
        Image.open(image_path).convert("RGB"))
    from sparo_fast.clip import get_tokenizer

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
    chosen = viz.slot_views(model, pixels, None, slots=[5, 2])
    assert [c.slot for c in chosen] == [5, 2] and chosen[0].text_attn is None


def _fails(capsys, argv, pattern):
    code = viz.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("sparo_fast.visualize: error:"), err
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
    r = subprocess.run([sys.executable, "-m", "sparo_fast.visualize", "--model", "ViT-Tiny-SPARO", "--image",
                        str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png")],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"sparo_fast.visualize: error: image '{tmp_path / 'missing.png'}' not found"]
