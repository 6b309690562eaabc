"""load_checkpoint: published trainer checkpoints, plain state dicts, clear errors."""
import argparse
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from accuracy import assert_close, model_lengths  # noqa: E402
from sparo_fast.clip import CheckpointError, create_model, get_tokenizer, load_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA / "clip_tiny.pt", weights_only=False)


def _features(m, golden):
    with torch.no_grad():
        return m.encode_image(golden["images"].float()), m.encode_text(golden["tokens"])


@pytest.mark.parametrize("layout", ["trainer", "trainer_module", "plain", "plain_module"])
def test_round_trip(tmp_path, golden, layout):
    sd = golden["state_dict"]
    if layout.endswith("module"):
        sd = {"module." + k: v for k, v in sd.items()}
    # what the published trainer saves: epoch, name, state_dict, optimizer
    obj = {"epoch": 25, "name": "run", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}} \
        if layout.startswith("trainer") else sd
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    m = create_model(golden["config"])
    res = load_checkpoint(m, path)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in golden["state_dict"].items():
        assert torch.equal(m.state_dict()[k], v), k
    img, txt = _features(m.eval(), golden)
    # accuracy.py's criterion, the published math at float32 on the same weights as PyTorch's error
    m.set_backend("reference")
    p_img, p_txt = _features(m, golden)
    grid, batch = m.visual.grid_size, golden["images"].shape[0]
    K = model_lengths(m, batch * (grid[0] * grid[1] + 1), batch * golden["tokens"].shape[1])
    for name, got, pt in (("image_features", img, p_img), ("text_features", txt, p_txt)):
        assert_close(name, got, golden[name], pt, dtype=torch.float32, K=K, seed="none (golden file clip_tiny.pt)")
    torch.testing.assert_close(img.double(), golden["image_features"], atol=2e-5, rtol=0)
    torch.testing.assert_close(txt.double(), golden["text_features"], atol=2e-5, rtol=0)


def test_save_and_reload_own_model(tmp_path):
    torch.manual_seed(0)
    a = create_model("ViT-Tiny-SPARO")
    torch.save({"state_dict": a.state_dict()}, tmp_path / "a.pt")
    b = create_model("ViT-Tiny-SPARO", pretrained=str(tmp_path / "a.pt"))
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # into a reduced-precision model: values are cast on load
    c = create_model("ViT-Tiny-SPARO", precision="bf16")
    load_checkpoint(c, tmp_path / "a.pt")
    tok = get_tokenizer("ViT-Tiny-SPARO")
    with torch.no_grad():
        fa = a.eval().encode_text(tok(["a cat"]))
        fc = c.eval().encode_text(tok(["a cat"]))
    assert (fa @ fc.T).item() > 0.99


def test_missing_file(tmp_path):
    m = create_model("ViT-Tiny-SPARO")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(m, tmp_path / "nope.pt")


def test_unreadable_file(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a checkpoint")
    m = create_model("ViT-Tiny-SPARO")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(m, p)
    with pytest.raises(ValueError):  # CheckpointError is a ValueError
        load_checkpoint(m, p)
    good = tmp_path / "good.pt"
    torch.save(m.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(m, cut)


def test_pickled_objects_need_weights_only_false(tmp_path):
    m = create_model("ViT-Tiny-SPARO")
    p = tmp_path / "args.pt"
    torch.save({"state_dict": m.state_dict(), "args": argparse.Namespace(lr=1.0)}, p)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(m, p)
    load_checkpoint(m, p, weights_only=False)


def test_position_embedding_resized_like_open_clip(golden):
    m = create_model(golden["config"], override={"vision_cfg": {"image_size": 64}})
    load_checkpoint(m, golden["state_dict"])
    assert m.visual.positional_embedding.shape == (65, 64)
    torch.testing.assert_close(m.visual.positional_embedding[0], golden["state_dict"]["visual.positional_embedding"][0])


def test_no_state_dict(tmp_path):
    p = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(create_model("ViT-Tiny-SPARO"), p)


def test_mismatching_checkpoints(tmp_path, golden):
    p = tmp_path / "golden.pt"
    torch.save({"state_dict": golden["state_dict"]}, p)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(create_model("ViT-Tiny-SPARO"), p)
    base = create_model("ViT-Tiny")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    with pytest.raises(CheckpointError, match="baseline CLIP checkpoint"):
        load_checkpoint(create_model("ViT-Tiny-SPARO"), tmp_path / "base.pt")
    # non-strict: missing/unexpected keys allowed, shapes still checked
    m = create_model(golden["config"])
    partial = {k: v for k, v in golden["state_dict"].items() if not k.startswith("text_sparo.")}
    res = load_checkpoint(m, partial, strict=False)
    assert "text_sparo.q_emb" in res.missing_keys
    with pytest.raises(CheckpointError, match="missing key"):
        load_checkpoint(m, partial, strict=True)


def test_shared_kv_conflict(golden):
    sd = dict(golden["state_dict"])
    sd["visual.sparo.v.weight"] = sd["visual.sparo.v.weight"] + 1
    with pytest.raises(CheckpointError, match="share_kv"):
        load_checkpoint(create_model(golden["config"]), sd)
    m = create_model(golden["config"], override={"share_kv": False})
    load_checkpoint(m, sd)
    assert torch.equal(m.visual.sparo.v.weight, sd["visual.sparo.v.weight"])
