"""The published comparison models (global average pool, bottleneck, codebook): their forward
against a float64 reimplementation of the published equations, written here from the published
``src/open_clip/model.py``/``transformer.py``, and their state-dict keys."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

from sparo_fast.clip import BaselineCLIP, ComparisonCLIP, create_model, load_checkpoint  # noqa: E402
from sparo_fast.clip.baselines import sparsemax  # noqa: E402

EOT = 49407
TINY = {"ViT-Tiny-GAP": {"vision_cfg": {"global_average_pool": True}},
        "ViT-Tiny-Bottleneck": {"bottleneck_dim": 256, "embed_dim": 2048},
        "ViT-Tiny-Codebook": {"use_codebook": True, "num_codes": 1024}}


# ------------------------------------------------------------------ float64 reference (published)
def _ln(x, sd, p, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[p + ".weight"] + sd[p + ".bias"]


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _blocks(x, sd, pre, heads, mask=None):
    B, N, D = x.shape
    hd = D // heads
    i = 0
    while f"{pre}transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"{pre}transformer.resblocks.{i}."
        q, k, v = (_ln(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.reshape(B, N, heads, hd).transpose(1, 2) for t in (q, k, v))
        a = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if mask is not None:
            a = a + mask
        o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = _gelu(_ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        i += 1
    return x


def _image_tokens(sd, images, patch, heads):
    """Last block's output [B, 1 + patches, width] of the published VisionTransformer."""
    B, C, H, W = images.shape
    w = sd["visual.conv1.weight"]
    patches = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    x = patches.reshape(B, (H // patch) * (W // patch), -1) @ w.reshape(w.shape[0], -1).T
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, -1), x], 1) + sd["visual.positional_embedding"]
    return _blocks(_ln(x, sd, "visual.ln_pre"), sd, "visual.", heads)


def _text_tokens(sd, text, heads):
    n = text.shape[1]
    x = sd["token_embedding.weight"][text] + sd["positional_embedding"]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype).triu(1)
    return _blocks(x, sd, "", heads, causal)


def _sparsemax_bisect(z):
    """Sparsemax by bisection on the threshold tau: sum(max(z - tau, 0)) = 1."""
    lo = z.max(-1, keepdim=True).values - 1
    hi = z.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        big = (z - mid).clamp(min=0).sum(-1, keepdim=True) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return (z - (lo + hi) / 2).clamp(min=0)


def _fdt(sd, prefix, tokens, eos=None):
    """The published FDTQueryModel (sparsemax, max pooling, temperature 1000)."""
    codes = sd["space_dict"]
    p = prefix + ".q_map."
    q = _ln(tokens, sd, p + "0") @ sd[p + "1.weight"].T + sd[p + "1.bias"]
    q = _ln(_gelu(q), sd, p + "3") @ sd[p + "4.weight"].T + sd[p + "4.bias"]
    dots = q @ codes.T / math.sqrt(codes.shape[1])
    if eos is not None:
        dots = dots * (torch.arange(q.shape[1])[None, :] <= eos[:, None]).to(dots)[..., None]
    return _sparsemax_bisect((dots / 1000).max(1).values) @ codes


def reference(sd, cfg, images, text):
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    img = _image_tokens(sd, images, v["patch_size"], v["width"] // v["head_width"])
    txt = _text_tokens(sd, text, t["heads"])
    eos = text.argmax(-1)
    if cfg.get("use_codebook"):
        img, txt = _fdt(sd, "img_query_model", img[:, 1:]), _fdt(sd, "txt_query_model", txt, eos)
    else:
        pooled = img.mean(1) if v.get("global_average_pool") else img[:, 0]
        img = _ln(pooled, sd, "visual.ln_post") @ sd["visual.proj"]
        txt = _ln(txt, sd, "ln_final")[torch.arange(len(text)), eos] @ sd["text_projection"]
    if cfg.get("bottleneck_dim"):
        img = img @ sd["vision_bottleproj.weight"].T + sd["vision_bottleproj.bias"]
        txt = txt @ sd["text_bottleproj.weight"].T + sd["text_bottleproj.bias"]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _random_text(n, ctx, gen):
    text = torch.zeros(n, ctx, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, ctx, (1,), generator=gen))
        text[i, :length] = torch.randint(1, EOT - 1, (length,), generator=gen)
        text[i, length] = EOT
    return text


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,code_scale", [("ViT-Tiny", 1.0), *((n, 1.0) for n in TINY),
                                             ("ViT-Tiny-Codebook", 100.0)])
def test_forward_matches_published_equations(name, code_scale):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = create_model(name, fused=False).double().eval()
    cfg = model.config
    with torch.no_grad():
        for p in model.parameters():  # fresh random weights, biases and LayerNorm affines included
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if code_scale != 1.0:  # spread the codes so that sparsemax keeps only a few of them
            model.space_dict.mul_(code_scale)
    images = torch.randn(3, 3, 64, 64, generator=gen, dtype=torch.float64)
    text = _random_text(3, cfg["text_cfg"]["context_length"], gen)
    with torch.no_grad():
        img, txt, _ = model(images, text)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        want_img, want_txt = reference(sd, cfg, images, text)
    assert img.dtype == torch.float64 and img.shape == (3, cfg["embed_dim"])
    torch.testing.assert_close(img, want_img, rtol=0, atol=1e-10)
    torch.testing.assert_close(txt, want_txt, rtol=0, atol=1e-10)
    if code_scale != 1.0:  # the case above ran in sparsemax's sparse regime (some codes kept, not all)
        with torch.no_grad():
            q = model.img_query_model.q_map(model.visual(images))
            logits = (q @ model.space_dict.T / math.sqrt(q.shape[-1]) / 1000).max(1).values
        kept = (sparsemax(logits) > 0).sum(-1)
        assert ((kept > 1) & (kept < model.space_dict.shape[0])).all(), kept


def _published_keys(variant, layers=3):
    names = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias")
    keys = {f"{pre}transformer.resblocks.{i}.{n}" for pre in ("visual.", "") for i in range(layers) for n in names}
    keys |= {"visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
             "visual.ln_pre.bias", "token_embedding.weight", "positional_embedding", "logit_scale"}
    if variant == "codebook":
        keys |= {"space_dict"} | {f"{m}_query_model.q_map.{i}.{w}" for m in ("img", "txt") for i in (0, 1, 3, 4)
                                  for w in ("weight", "bias")}
    else:
        keys |= {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "ln_final.weight", "ln_final.bias",
                 "text_projection"}
    if variant == "bottleneck":
        keys |= {f"{t}_bottleproj.{w}" for t in ("vision", "text") for w in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("override,variant,shapes", [
    ({"vision_cfg": {"global_average_pool": True}}, "gap", {"visual.proj": (128, 256)}),
    ({"bottleneck_dim": 512, "embed_dim": 4096}, "bottleneck",
     {"visual.proj": (128, 512), "text_projection": (128, 512), "vision_bottleproj.weight": (4096, 512)}),
    ({"use_codebook": True}, "codebook",
     {"space_dict": (16384, 256), "img_query_model.q_map.1.weight": (256, 128),
      "txt_query_model.q_map.4.weight": (256, 256)}),
])
def test_published_overrides_and_state_dict_keys(override, variant, shapes):
    """The published scripts' --override-model-config values, applied to ViT-Tiny."""
    model = create_model("ViT-Tiny", override=override)
    assert isinstance(model, ComparisonCLIP) and isinstance(model, BaselineCLIP) and not model.use_sparo
    sd = model.state_dict()
    assert set(sd) == _published_keys(variant)
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    fresh = create_model("ViT-Tiny", override=override)
    load_checkpoint(fresh, sd, strict=True)  # the published layout loads back strictly
    torch.testing.assert_close(fresh.state_dict(), sd)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_configs_are_vit_tiny_with_the_override(name):
    a = create_model(name)
    b = create_model("ViT-Tiny", override=TINY[name])
    assert a.config == b.config
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    torch.manual_seed(0)
    img, txt, _ = a(torch.randn(2, 3, 64, 64), torch.randint(1, EOT, (2, 32)))
    assert img.shape == txt.shape == (2, a.embed_dim)


def test_sparsemax_against_bisection_and_gradient():
    z = torch.randn(5, 9, dtype=torch.float64) * 2
    out = sparsemax(z)
    torch.testing.assert_close(out, _sparsemax_bisect(z), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.sum(-1), torch.ones(5, dtype=torch.float64))
    assert (out == 0).any() and (out >= 0).all()
    torch.testing.assert_close(sparsemax(z.T, dim=0), out.T)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(sparsemax, (z,))


def test_codebook_trains_and_runs_in_bf16():
    torch.manual_seed(0)
    m = create_model("ViT-Tiny-Codebook")
    img, txt, scale = m(torch.randn(2, 3, 64, 64), torch.randint(1, EOT, (2, 32)))
    (scale * img @ txt.T).logsumexp(-1).sum().backward()
    assert m.space_dict.grad.abs().sum() > 0 and m.img_query_model.q_map[1].weight.grad.abs().sum() > 0
    assert m.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    lp = create_model("ViT-Tiny-Codebook", precision="bf16")
    with torch.no_grad():
        out = lp.encode_image(torch.randn(2, 3, 64, 64, dtype=torch.bfloat16), normalize=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("override,pattern", [
    ({"use_codebok": True}, "unknown model config key(s) ['use_codebok']"),
    ({"vision_cfg": {"global_avg_pool": True}}, "unknown vision_cfg key(s) ['global_avg_pool']"),
    ({"bottleneck_dim": 0}, "bottleneck_dim must be a positive integer"),
    ({"use_codebook": True, "num_codes": -3}, "num_codes must be a positive integer"),
])
def test_bad_options_fail_with_one_line(override, pattern):
    with pytest.raises(ValueError) as e:
        create_model("ViT-Tiny", override=override)
    assert pattern in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,pattern", [
    ({"use_codebook": True}, "cannot be combined"), ({"bottleneck_dim": 64}, "CLIP baseline only")])
def test_sparo_rejects_baseline_options(override, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_model("ViT-Tiny-SPARO", override=override)
