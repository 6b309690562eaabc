"""Drop-in compatibility: published state-dict keys both ways, and ``convert``."""
import copy

import pytest
import torch
from torch import nn

import sparo_fast
from accuracy import assert_close, module_lengths, readout_magnitudes
from sparo_fast import SparoReadout
from helpers import PublishedLayoutSparo

CONFIGS = [dict(dim=12, L=6, V=5, attn_dim=4),
           dict(dim=12, L=6, V=5, attn_dim=4, value_dim=3, num_heads=3, share_kv=False)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_state_dict_round_trip(cfg):
    seed = "torch.manual_seed(0)"
    print(seed)
    torch.manual_seed(0)
    published = PublishedLayoutSparo(**cfg).double()
    with torch.no_grad():
        for p in published.parameters():
            p.normal_()
    ours = SparoReadout(**cfg, dtype=torch.float64)
    sd = published.state_dict()
    assert list(ours.state_dict().keys()) == list(sd.keys())
    ours.load_state_dict(sd, strict=True)
    if cfg.get("share_kv", True):  # both key sets appear and alias one tensor
        assert {"k.weight", "v.weight"} <= set(ours.state_dict())
        assert ours.k.weight is ours.v.weight
    back = PublishedLayoutSparo(**cfg).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 7, cfg["dim"], dtype=torch.float64)
    # float64 against float64: accuracy.py's floor, scaled by the magnitude of the terms summed
    mags, ks = readout_magnitudes(x, None, ours.params()), module_lengths(ours, x)
    for name, a, b in zip(("out", "attn"), published(x), ours(x)):
        assert_close(name, b, a, dtype=torch.float64, K=ks[name], terms=mags[name], seed=seed)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    for a, b in zip(published(x), back(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_same_seed_same_weights_as_published_layout():
    for cfg in CONFIGS:
        torch.manual_seed(7)
        a = PublishedLayoutSparo(**cfg).state_dict()
        torch.manual_seed(7)
        b = SparoReadout(**cfg).state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


class _Tower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg["dim"])
        self.sparo = PublishedLayoutSparo(**cfg)

    def forward(self, x):
        return self.sparo(self.ln(x))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_convert_replaces_published_modules_in_place(backend):
    print("torch.manual_seed(0)")
    torch.manual_seed(0)
    model = nn.ModuleDict({"visual": _Tower(CONFIGS[0]), "text_sparo": PublishedLayoutSparo(**CONFIGS[1])})
    x = torch.randn(2, 9, 12)
    eos = torch.tensor([3, 8])
    before = (model["visual"](x), model["text_sparo"](x, eos))
    model64 = copy.deepcopy(model).double()
    exact = (model64["visual"](x.double()), model64["text_sparo"](x.double(), eos))
    params_before = {n: p for n, p in model.named_parameters()}
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}

    out = sparo_fast.convert(model, backend=backend)
    assert out is model
    assert isinstance(model["visual"].sparo, SparoReadout) and isinstance(model["text_sparo"], SparoReadout)
    assert model["text_sparo"].backend == backend
    # the very same parameter tensors (optimizers keep working), the same state dict
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert model.state_dict().keys() == sd_before.keys()
    after = (model["visual"](x), model["text_sparo"](x, eos))
    # the converted modules against the float64 published ones with accuracy.py's criterion (the
    # published modules at float32 as PyTorch's error), and the tolerance the test began with
    for tower, a, b, r in zip(("visual", "text"), before, after, exact):
        ks = module_lengths(model["text_sparo"] if tower == "text" else model["visual"].sparo, x)
        for i, name in enumerate(("out", "attn")):
            assert_close(f"{tower} {name}", b[i], r[i], a[i], dtype=torch.float32, K=ks[name],
                         seed="torch.manual_seed(0)")
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-6)


def test_convert_on_a_bare_module_and_idempotence():
    m = PublishedLayoutSparo(**CONFIGS[0])
    new = sparo_fast.convert(m)
    assert isinstance(new, SparoReadout) and new.q_emb is m.q_emb
    assert sparo_fast.convert(new) is new  # already converted: untouched
