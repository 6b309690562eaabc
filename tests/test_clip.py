"""SPARO CLIP on OpenCLIP: golden reproduction, configs, precision, OpenCLIP interoperability."""
import warnings
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

from accuracy import assert_close, model_lengths  # noqa: E402
from sparo_fast import sparo_readout_triton as triton_backend  # noqa: E402
from sparo_fast.clip import (BaselineCLIP, SparoCLIP, create_model, create_model_and_transforms,  # noqa: E402
                             get_model_config, get_tokenizer, list_models, load_checkpoint)
from sparo_fast.clip.factory import build_model  # noqa: E402

DATA = Path(__file__).parent / "data"
GOLDEN_KEYS = ("image_slots", "image_attn", "text_slots", "text_attn", "image_features", "text_features")


@pytest.fixture(scope="module")
def golden():
    return torch.load(DATA / "clip_tiny.pt", weights_only=False)


@pytest.fixture(scope="module")
def golden_model(golden):
    model = create_model(golden["config"], fused=False)
    load_checkpoint(model, golden["state_dict"], strict=True)
    return model.double().eval()


TRITON_SKIP = None if triton_backend.is_available(torch.device("cpu")) else (
    "sparo_fast.sparo_readout_triton.is_available(cpu) is False (Triton or TRITON_INTERPRET=1 missing)")


def _encode_all(m, golden):
    with torch.no_grad():
        img_slots, img_attn = m.encode_image(golden["images"], return_sparo=True, return_attn=True)
        txt_slots, txt_attn = m.encode_text(golden["tokens"], return_sparo=True, return_attn=True)
        img_f, txt_f, scale = m(golden["images"], golden["tokens"])
    return dict(image_slots=img_slots, image_attn=img_attn, text_slots=txt_slots, text_attn=txt_attn,
                image_features=img_f, text_features=txt_f, logit_scale=scale)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_golden_reproduction(golden, golden_model, backend):
    m = golden_model
    m.set_backend(backend)
    try:
        got = _encode_all(m, golden)
    finally:
        m.set_backend("reference")
    for key in GOLDEN_KEYS + ("logit_scale",):
        assert got[key].dtype == torch.float64
        torch.testing.assert_close(got[key], golden[key], rtol=0, atol=1e-10, msg=key)
    # the default embedding is the flattened slots, unit norm
    torch.testing.assert_close(got["image_features"], got["image_slots"].flatten(1))
    torch.testing.assert_close(got["image_features"].norm(dim=-1), torch.ones(3, dtype=torch.float64))


@pytest.mark.skipif(TRITON_SKIP is not None, reason=str(TRITON_SKIP))
def test_golden_reproduction_triton_float32(golden):
    """The kernels take float16/bfloat16/float32 only (float64 falls back to torch), so the
    triton path is checked in float32 against the float64 golden values."""
    m = create_model(golden["config"], backend="triton")
    load_checkpoint(m, golden["state_dict"])
    m.eval()
    golden32 = dict(golden, images=golden["images"].float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        got = _encode_all(m, golden32)
    # PyTorch's own float32 error on the same inputs: the same model on the published math and on
    # the absorbed torch backend (accuracy.py's criterion); the fixed tolerance it began with too
    pytorch = []
    for backend in ("reference", "torch"):
        m.set_backend(backend)
        pytorch.append(_encode_all(m, golden32))
    grid, batch = m.visual.grid_size, golden["images"].shape[0]
    K = model_lengths(m, batch * (grid[0] * grid[1] + 1), batch * golden["tokens"].shape[1])
    for key in GOLDEN_KEYS + ("logit_scale",):
        assert got[key].dtype == torch.float32
        assert_close(key, got[key], golden[key], tuple(p[key] for p in pytorch), dtype=torch.float32, K=K,
                     seed="none (golden file clip_tiny.pt)")
        torch.testing.assert_close(got[key].double(), golden[key], rtol=0, atol=2e-5, msg=key)


def test_golden_state_dict_layout(golden, golden_model):
    assert set(golden_model.state_dict()) == set(golden["state_dict"])
    assert "visual.proj" not in golden_model.state_dict()
    assert "text_projection" not in golden_model.state_dict()


def test_tokenizer_matches_golden(golden):
    tok = get_tokenizer(golden["config"])
    assert torch.equal(tok(golden["captions"]), golden["tokens"])
    assert get_tokenizer("ViT-Tiny-SPARO")("a photo").shape == (1, 32)


def test_registry_and_tiny_configs():
    names = list_models()
    for n in ("ViT-B-32-SPARO", "ViT-B-16-SPARO", "ViT-L-14-SPARO", "ViT-Tiny-SPARO", "ViT-Tiny"):
        assert n in names
    c = get_model_config("ViT-Tiny-SPARO")
    assert c["vision_cfg"] == {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32}
    assert c["text_cfg"] == {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
    assert (c["L"], c["V"], c["embed_dim"], c["sparo_type"], c["share_kv"], c["reduce_depth"]) == \
        (16, 16, 256, "cont:const", True, 0)
    b = get_model_config("ViT-Tiny")
    assert b["vision_cfg"] == c["vision_cfg"] and b["text_cfg"] == c["text_cfg"] and b["embed_dim"] == 256
    assert "L" not in b and "use_sparo" not in b


def test_tiny_models_build_and_run():
    tok = get_tokenizer("ViT-Tiny-SPARO")
    text = tok(["a red circle", "two dogs"])
    img = torch.randn(2, 3, 64, 64)
    m = create_model("ViT-Tiny-SPARO")
    assert isinstance(m, SparoCLIP) and isinstance(m, open_clip.CLIP)
    assert m.visual.sparo.backend == "auto" and create_model("ViT-Tiny-SPARO", fused=False).text_sparo.backend == "reference"
    f, g, s = m(img, text)
    assert f.shape == g.shape == (2, 256) and s.dim() == 0
    assert len(m.visual.transformer.resblocks) == 3 and len(m.transformer.resblocks) == 3
    b = create_model("ViT-Tiny")
    assert isinstance(b, BaselineCLIP) and not b.use_sparo
    fb, gb, _ = b(img, text)
    assert fb.shape == gb.shape == (2, 256)
    assert "visual.proj" in b.state_dict() and "text_projection" in b.state_dict()
    with pytest.raises(ValueError, match="SPARO model"):
        b.encode_image(img, return_sparo=True)


@pytest.mark.parametrize("name,patch,v_width,t_width,v_layers", [
    ("ViT-B-32-SPARO", 32, 768, 512, 12), ("ViT-B-16-SPARO", 16, 768, 512, 12), ("ViT-L-14-SPARO", 14, 1024, 768, 24)])
def test_published_configs_structure(name, patch, v_width, t_width, v_layers):
    cfg = get_model_config(name)
    assert (cfg["L"], cfg["V"], cfg["reduce_depth"], cfg["share_kv"], cfg["sparo_type"]) == (64, 64, 1, True, "cont:const")
    with torch.device("meta"):  # structure only: no memory, no init cost
        m = build_model(cfg)
    sd = m.state_dict()
    assert len(m.visual.transformer.resblocks) == v_layers - 1 and len(m.transformer.resblocks) == 11
    assert m.visual.patch_size == (patch, patch) and m.context_length == 77
    assert sd["visual.sparo.q_emb"].shape == (1, 64, 1, 1, 64)
    assert sd["visual.sparo.k.weight"].shape == (64 * 64, v_width)
    assert sd["text_sparo.k.weight"].shape == (64 * 64, t_width)
    assert sd["visual.sparo.proj.weight"].shape == sd["text_sparo.proj.weight"].shape == (64, 64)
    assert "visual.proj" not in sd and "text_projection" not in sd and m.embed_dim == 4096


def test_override_merges_nested_and_rejects_unknown():
    m = create_model("ViT-Tiny-SPARO", override={"L": 8, "V": 4, "sparo_type": "cont:softmax",
                                                 "vision_cfg": {"layers": 2}, "reduce_depth": 1})
    assert m.L == 8 and m.model_V == 5 and m.embed_dim == 32
    assert m.visual.image_size == (64, 64)  # nested merge kept the other vision keys
    assert len(m.visual.transformer.resblocks) == 1 and len(m.transformer.resblocks) == 2
    tok = get_tokenizer("ViT-Tiny-SPARO")
    f = m.encode_text(tok(["x"]))
    assert f.shape == (1, 32)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="unknown model config key"):
        create_model("ViT-Tiny-SPARO", override={"Lx": 3})
    with pytest.raises(ValueError, match="unknown vision_cfg key"):
        create_model("ViT-Tiny-SPARO", override={"vision_cfg": {"widht": 3}})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("ViT-Nope")
    with pytest.raises(ValueError, match="sparo_type"):
        create_model("ViT-Tiny-SPARO", override={"sparo_type": "cont:bogus"})
    with pytest.raises(ValueError, match="precision"):
        create_model("ViT-Tiny-SPARO", precision="fp8")


def test_sparo_options_heads_and_separate_kv():
    m = create_model("ViT-Tiny-SPARO", override={"sparo_heads": 4, "share_kv": False, "sparo_value_dim": 16,
                                                 "sparo_attn_dim": 8})
    sd = m.state_dict()
    assert sd["visual.sparo.q_emb"].shape == (1, 4, 4, 1, 8)
    assert sd["visual.sparo.v.weight"].shape == (4 * 16, 128)
    assert m.visual.sparo.k is not m.visual.sparo.v
    tok = get_tokenizer("ViT-Tiny-SPARO")
    f, g, _ = m(torch.randn(2, 3, 64, 64), tok(["a", "b"]))
    assert f.shape == g.shape == (2, 256)
    q = create_model("ViT-Tiny-SPARO", override={"share_queries": True})
    assert q.text_sparo.q_emb is q.visual.sparo.q_emb


def test_baseline_from_config_dict_and_open_clip_name():
    cfg = get_model_config("ViT-Tiny-SPARO")
    for k in ("use_sparo", "L", "V", "sparo_type", "share_kv", "share_queries", "sparo_heads",
              "sparo_attn_dim", "sparo_value_dim"):
        cfg.pop(k)
    assert isinstance(create_model(cfg), BaselineCLIP)
    assert isinstance(create_model("ViT-Tiny-SPARO", override={"use_sparo": False}), BaselineCLIP)
    with torch.device("meta"):
        b = build_model(get_model_config("ViT-B-32"))
    assert isinstance(b, BaselineCLIP) and b.visual.proj.shape == (768, 512)


def test_normalize_false_is_rejected():
    m = create_model("ViT-Tiny-SPARO")
    with pytest.raises(ValueError, match="normalize=True"):
        m.encode_image(torch.randn(1, 3, 64, 64), normalize=False)
    with pytest.raises(ValueError, match="normalize=True"):
        m.encode_text(torch.zeros(1, 32, dtype=torch.long), normalize=False)


def test_return_attn_shapes_and_text_masking():
    torch.manual_seed(0)
    m = create_model("ViT-Tiny-SPARO").eval()
    tok = get_tokenizer("ViT-Tiny-SPARO")
    text = tok(["a", "a much longer caption with words"])
    with torch.no_grad():
        s, a = m.encode_image(torch.randn(2, 3, 64, 64), return_sparo=True, return_attn=True)
        ts, ta = m.encode_text(text, return_sparo=True, return_attn=True)
        f, fa = m.encode_image(torch.randn(2, 3, 64, 64), return_attn=True)
    assert s.shape == (2, 16, 16) and a.shape == (2, 16, 65) and f.shape == (2, 256) and fa.shape == (2, 16, 65)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 16))
    eos = text.argmax(-1)
    assert ta.shape == (2, 16, 32)
    for b in range(2):
        assert torch.all(ta[b, :, eos[b] + 1:] == 0)
    # the readouts only compute attention when asked (and are left as they were)
    assert not m.visual.sparo.need_weights and not m.text_sparo.need_weights


def test_grad_checkpointing_and_fsdp_friendly_layout():
    torch.manual_seed(0)
    m = create_model("ViT-Tiny-SPARO", fused=False)
    assert isinstance(m.logit_scale, torch.nn.Parameter) and m.logit_scale.dim() == 0
    assert m.visual.transformer.resblocks[0] is not None and m.transformer.resblocks[2] is not None
    tok = get_tokenizer("ViT-Tiny-SPARO")
    img, text = torch.randn(4, 3, 64, 64), tok(["a", "b", "c d", "e"])
    loss_fn = open_clip.ClipLoss()

    def grads():
        m.zero_grad()
        loss_fn(*m(img, text)).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    g0 = grads()
    m.set_grad_checkpointing(True)
    assert m.visual.transformer.grad_checkpointing and m.transformer.grad_checkpointing
    g1 = grads()
    m.set_grad_checkpointing(False)
    assert set(g0) == set(g1) and "visual.sparo.q_emb" in g0 and "text_sparo.proj.weight" in g0
    for n in g0:  # checkpointing recomputes the same ops in the same order: the same bits
        assert torch.equal(g0[n], g1[n]), n


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16", "fp16"])
def test_precisions(precision):
    m = create_model("ViT-Tiny-SPARO", precision=precision)
    dtype = torch.float16 if "fp16" in precision else torch.bfloat16
    assert m.visual.sparo.q_emb.dtype == dtype and m.text_sparo.k.weight.dtype == dtype
    tok = get_tokenizer("ViT-Tiny-SPARO")
    with torch.no_grad():
        f = m.encode_image(torch.randn(2, 3, 64, 64, dtype=dtype))
        g = m.encode_text(tok(["a", "b"]))
    assert f.dtype == g.dtype == torch.float32  # normalised in float32
    # unit norm up to float32 rounding of a sum over the embedding (accuracy.py's floor)
    for name, e in (("image", f), ("text", g)):
        assert_close(f"{name} norm", e.norm(dim=-1), torch.ones(2, dtype=torch.float64), dtype=torch.float32,
                     K=e.shape[-1], seed="none (default init, torch.randn images)")
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_autocast_training_step():
    m = create_model("ViT-Tiny-SPARO", output_dict=True)
    tok = get_tokenizer("ViT-Tiny-SPARO")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 64, 64), tok(["a", "b"]))
        loss = open_clip.ClipLoss()(**out)
    loss.backward()
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert m.visual.sparo.q_emb.grad is not None and torch.isfinite(m.visual.sparo.q_emb.grad).all()


def test_zero_shot_classifier_and_transforms():
    model, train_tf, val_tf = create_model_and_transforms("ViT-Tiny-SPARO")
    tok = get_tokenizer("ViT-Tiny-SPARO")
    clf = open_clip.build_zero_shot_classifier(
        model, tokenizer=tok, classnames=["cat", "dog", "car"], templates=["a photo of a {}.", "a {}."],
        num_classes_per_batch=2, device="cpu", use_tqdm=False)
    assert clf.shape == (256, 3)
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(3))
    x = val_tf(Image.new("RGB", (80, 100), (120, 30, 200)))
    assert x.shape == (3, 64, 64)
    with torch.no_grad():
        logits = model.encode_image(x[None]) @ clf
    assert logits.shape == (1, 3)
