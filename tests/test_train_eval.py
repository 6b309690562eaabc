"""Evaluation pieces in-process on a one-rank gloo group: ImageNet zero-shot through an ImageFolder
tree, and the synthetic metrics (retrieval, swap accuracy, colour/shape zero-shot)."""
import socket

import pytest
import torch
import torch.distributed as dist


@pytest.fixture
def one_rank(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tiny():
    from sparo_fast.clip import create_model_and_transforms, get_tokenizer

    torch.manual_seed(0)
    model, _, pre_val = create_model_and_transforms("ViT-Tiny-SPARO", fused=True, output_dict=True)
    return model.eval(), pre_val, get_tokenizer("ViT-Tiny-SPARO")


def test_imagenet_zero_shot_on_imagefolder(one_rank, tiny, tmp_path, monkeypatch):
    import open_clip.zero_shot_metadata as meta
    from PIL import Image

    from sparo_fast_training import evaluate as ev

    monkeypatch.setattr(meta, "OPENAI_IMAGENET_TEMPLATES", meta.OPENAI_IMAGENET_TEMPLATES[:1])  # CPU budget
    for c in range(1000):
        (tmp_path / f"n{c:05d}").mkdir()
    for c, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (80, 80), color).save(tmp_path / f"n{c:05d}" / "a.png")
    model, pre_val, tok = tiny
    res = ev.imagenet_zero_shot(model, tok, str(tmp_path), pre_val, batch_size=2, workers=0,
                                device=torch.device("cpu"), rank=0, world_size=1)
    assert res["imagenet_count"] == 3
    assert 0.0 <= res["imagenet_top1"] <= res["imagenet_top5"] <= 1.0


def test_synthetic_metrics(one_rank, tiny, tmp_path):
    from sparo_fast_training import data, evaluate as ev, synthetic

    d = synthetic.ensure_synthetic(str(tmp_path), 10, 60, shard_size=32, log=lambda *_: None)
    model, pre_val, tok = tiny
    samples = data.load_eval_samples(data.expand_urls(d["val"]), pre_val, tok, 0, 1)
    assert len(samples) == 60
    res = ev.evaluate_pairs(model, samples, tok, 16, torch.device("cpu"), torch.zeros(3, 64, 64), 32)
    for k in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@5",
              "swap_accuracy", "zeroshot_color_top1", "zeroshot_shape_top1"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["image_to_text_R@1"] <= res["image_to_text_R@5"]
    assert res["swap_count"] == sum(1 for s in samples if s["meta"].get("neg_caption"))


def test_synthetic_captions_and_swaps():
    import random

    from sparo_fast_training import synthetic

    img, m = synthetic.make_sample(random.Random(1), 2)
    assert img.size == (64, 64)
    a, b = m["colors"]
    assert m["caption"].count(a) == 1 and m["neg_caption"] != m["caption"]
    # the negative swaps the two colours and keeps shapes and relation
    assert m["neg_caption"].replace(a, "@").replace(b, a).replace("@", b).replace("an ", "a ") == \
        m["caption"].replace("an ", "a ")
