"""Concept selection: ``slots=`` in the encoders, ``set_active_slots``, ``rank_slots``."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from accuracy import assert_close  # noqa: E402
from sparo_fast.clip import check_slots, create_model, get_tokenizer, rank_slots  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("ViT-Tiny-SPARO", fused=False).eval()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    tok = get_tokenizer("ViT-Tiny-SPARO")
    return torch.randn(3, 3, 64, 64), tok(["a red circle", "a dog", "two green triangles"])


@pytest.mark.parametrize("sparo_type", ["cont:const", "sqrtsem:softmax"])
def test_slots_zero_others_and_renormalise(batch, sparo_type):
    torch.manual_seed(0)
    m = create_model("ViT-Tiny-SPARO", override={"sparo_type": sparo_type}).eval()
    img, txt = batch
    sel = [3, 0, 7]
    with torch.no_grad():
        full = m.encode_image(img, return_sparo=True)
        sub = m.encode_image(img, return_sparo=True, slots=sel)
        flat = m.encode_image(img, slots=torch.tensor(sel))
        tflat = m.encode_text(txt, slots=sel)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[sel] = True
    assert torch.all(sub[:, ~keep] == 0)
    expect = full * keep[:, None]
    expect = expect / expect.flatten(1).norm(dim=-1)[:, None, None]
    torch.testing.assert_close(sub, expect)
    torch.testing.assert_close(flat, sub.flatten(1))
    for name, e in (("image", flat), ("text", tflat)):  # unit norm up to float32 rounding of the sum
        assert_close(f"{name} norm", e.norm(dim=-1), torch.ones(3, dtype=torch.float64), dtype=torch.float32,
                     K=e.shape[-1], seed="torch.manual_seed(0)")
    torch.testing.assert_close(flat.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(tflat.norm(dim=-1), torch.ones(3))
    # with cont:const every slot weighs sqrt(1/L): the selection re-weighs the kept ones sqrt(1/k)
    if sparo_type == "cont:const":
        torch.testing.assert_close(sub[:, sel], full[:, sel] * (16 / 3) ** 0.5)


def test_slot_validation(model, batch):
    img, _ = batch
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        model.encode_image(img, slots=[0, 16])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        model.encode_image(img, slots=[-1])
    with pytest.raises(ValueError, match="duplicate"):
        model.encode_image(img, slots=[1, 2, 1])
    with pytest.raises(ValueError, match="at least one"):
        model.encode_image(img, slots=[])
    with pytest.raises(TypeError, match="integers"):
        model.encode_image(img, slots=[1.0])
    with pytest.raises(TypeError, match="integers"):
        model.encode_image(img, slots=torch.tensor([0.0]))
    with pytest.raises(TypeError, match="integers"):
        model.encode_image(img, slots=[True])
    with pytest.raises(ValueError, match="1-D"):
        model.encode_image(img, slots=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError):
        model.encode_image(img, slots=3)
    assert check_slots(np.array([2, 5]), 16) == (2, 5)
    assert check_slots(range(3), 16) == (0, 1, 2)


def test_active_slots_reach_open_clip_helpers(batch):
    torch.manual_seed(0)
    m = create_model("ViT-Tiny-SPARO").eval()
    img, txt = batch
    tok = get_tokenizer("ViT-Tiny-SPARO")
    with torch.no_grad():
        want = m.encode_text(tok(["a photo of a cat."]), slots=[1, 4])
        m.set_active_slots([1, 4])
        clf = open_clip.build_zero_shot_classifier(m, tokenizer=tok, classnames=["cat"],
                                                   templates=["a photo of a {}."], device="cpu", use_tqdm=False)
        f, g, _ = m(img, txt)
        m.set_active_slots(None)
        f_all = m.encode_image(img)
    torch.testing.assert_close(clf[:, 0], want[0])
    assert torch.all(f.view(3, 16, 16)[:, [0, 2, 3]] == 0)
    assert not torch.equal(f, f_all)
    with pytest.raises(ValueError):
        m.set_active_slots([99])


class _StubModel(torch.nn.Module):
    """Slots with a known alignment: image slot l = e_0; text slot l = cos_l e_0 + sin_l e_1."""
    use_sparo = True

    def __init__(self, cosines):
        super().__init__()
        self.cosines = torch.as_tensor(cosines, dtype=torch.float64)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def _slots(self, n, text):
        L = len(self.cosines)
        out = torch.zeros(n, L, 4, dtype=torch.float64)
        if text:
            out[..., 0] = self.cosines
            out[..., 1] = (1 - self.cosines ** 2).sqrt()
        else:
            out[..., 0] = 1.0
        # per-sample scale and sign-preserving noise in an orthogonal channel must not matter
        scale = torch.arange(1, n + 1, dtype=torch.float64)[:, None, None]
        return out * scale / L ** 0.5

    def encode_image(self, images, normalize=True, return_sparo=False):
        return self._slots(images.shape[0], False)

    def encode_text(self, texts, normalize=True, return_sparo=False):
        return self._slots(texts.shape[0], True)


def test_rank_slots_known_answer():
    cosines = [0.1, 0.9, -0.5, 0.95, 0.3]
    stub = _StubModel(cosines)
    ranking = rank_slots(stub, torch.zeros(7, 3, 2, 2), torch.zeros(7, 5, dtype=torch.long), batch_size=3)
    assert ranking.indices.tolist() == [3, 1, 4, 0, 2]
    torch.testing.assert_close(ranking.scores, torch.tensor([0.95, 0.9, 0.3, 0.1, -0.5], dtype=torch.float64))
    idx, scores = ranking  # unpacks as (indices, scores)
    assert idx.dtype == torch.long


def test_rank_slots_real_model(model, batch):
    img, txt = batch
    model.train()
    ranking = rank_slots(model, img, txt, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    assert sorted(ranking.indices.tolist()) == list(range(16))
    assert torch.all(ranking.scores[:-1] >= ranking.scores[1:])
    with torch.no_grad():
        a = model.encode_image(img, return_sparo=True)
        b = model.encode_text(txt, return_sparo=True)
    direct = F.cosine_similarity(a.double(), b.double(), dim=-1).mean(0)
    torch.testing.assert_close(ranking.scores, direct[ranking.indices])
    # strings are tokenised with the model's context length
    r2 = rank_slots(model, img, ["a red circle", "a dog", "two green triangles"])
    assert torch.equal(r2.indices, ranking.indices)
    with pytest.raises(ValueError, match="paired"):
        rank_slots(model, img, txt[:2])
    with pytest.raises(ValueError, match="SPARO"):
        rank_slots(create_model("ViT-Tiny"), img, txt)
