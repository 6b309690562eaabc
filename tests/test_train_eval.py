"""Evaluation pieces in-process on a one-rank gloo group: ImageNet zero-shot through an ImageFolder
tree, the synthetic metrics (retrieval, swap accuracy, colour/shape zero-shot), and known-answer tests of
every metric on hand-built features."""
import math

import pytest
import torch


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
    assert 0.0 <= res["imagenet-zeroshot-val-top1"] <= res["imagenet-zeroshot-val-top5"] <= 1.0


def test_synthetic_metrics(one_rank, tiny, tmp_path):
    from sparo_fast_training import data, evaluate as ev, synthetic

    d = synthetic.ensure_synthetic(str(tmp_path), 10, 60, shard_size=32, log=lambda *_: None)
    model, pre_val, tok = tiny
    samples = data.load_eval_samples(data.expand_urls(d["val"]), pre_val, tok, 0, 1)
    assert len(samples) == 60
    res = ev.evaluate_pairs(model, samples, tok, 16, torch.device("cpu"), torch.zeros(3, 64, 64), 32)
    for k in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@10",
              "swap_accuracy", "zeroshot_color_top1", "zeroshot_shape_top1"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["image_to_text_R@1"] <= res["image_to_text_R@5"] <= res["image_to_text_R@10"]
    assert 1 <= res["text_to_image_median_rank"] <= res["num_samples"] == 60
    assert res["clip_val_loss"] > 0
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


# ------------------------------------------------------------------------ known answers


def ranks_of(sim):
    """0-based rank of the right answer (the diagonal) of each row: how many entries beat it."""
    return [(sim[i] > sim[i, i]).sum().item() for i in range(len(sim))]


def expected(ranks, prefix):
    r = torch.tensor(ranks, dtype=torch.float64)
    out = {f"{prefix}_R@{k}": (r < k).double().mean().item() for k in (1, 5, 10)}
    out[f"{prefix}_mean_rank"] = r.mean().item() + 1
    out[f"{prefix}_median_rank"] = math.floor(r.median().item() if len(r) % 2 else r.sort().values[
        len(r) // 2 - 1:len(r) // 2 + 1].mean().item()) + 1
    return out


def sim_with_ranks(ranks):
    """A similarity matrix whose row i has its diagonal at rank ``ranks[i]`` (no ties)."""
    n = len(ranks)
    sim = torch.randn(n, n, dtype=torch.float64)
    for i, r in enumerate(ranks):
        others = sorted((sim[i, j].item() for j in range(n) if j != i), reverse=True)
        hi = others[r - 1] if r > 0 else others[0] + 1.0
        lo = others[r] if r < n - 1 else others[-1] - 1.0
        sim[i, i] = (hi + lo) / 2
    return sim


def test_retrieval_metrics_hand_written_case():
    from sparo_fast_training import evaluate as ev

    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.25], [0.1, 0.3, 0.2]])
    # image->text ranks 0, 1, 1; text->image (columns) ranks 0, 0, 1
    m = ev.retrieval_metrics(torch.eye(3), sim.T.contiguous())
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3) and m["image_to_text_R@5"] == 1.0
    assert m["image_to_text_mean_rank"] == pytest.approx(5 / 3) and m["image_to_text_median_rank"] == 2
    assert m["text_to_image_R@1"] == pytest.approx(2 / 3)
    assert m["text_to_image_mean_rank"] == pytest.approx(4 / 3) and m["text_to_image_median_rank"] == 1


def test_retrieval_metrics_known_ranks():
    from sparo_fast_training import evaluate as ev

    n = 41
    ranks = torch.randint(0, n, (n,)).tolist()
    ranks[:3] = [0, 4, 9]  # always some at the R@1/5/10 borders
    sim = sim_with_ranks(ranks)
    assert ranks_of(sim) == ranks
    scale = float(torch.rand(()) * 50 + 1)  # ranks do not depend on the temperature
    m = ev.retrieval_metrics(torch.eye(n, dtype=torch.float64), sim.T.contiguous(), scale)
    want = {**expected(ranks, "image_to_text"), **expected(ranks_of(sim.T), "text_to_image")}
    assert m.keys() == want.keys()
    for k, v in want.items():
        assert m[k] == pytest.approx(v), k


def test_validation_loss_known_answer():
    from sparo_fast_training import evaluate as ev

    # orthonormal pairs: each batch of b pairs has logits s on the diagonal, 0 elsewhere, so both
    # directions' cross-entropy is log(1 + (b - 1) e^-s)
    n, b = 10, 4
    s = float(torch.rand(()) * 5 + 0.5)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    feats = q[:n]
    got = ev.validation_loss(feats, feats, s, b)
    want = (8 * math.log1p(3 * math.exp(-s)) + 2 * math.log1p(math.exp(-s))) / n
    assert got == pytest.approx(want, rel=1e-5)


def test_swap_accuracy_known_answer():
    from sparo_fast_training import evaluate as ev

    n = 20
    img = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    wrong = torch.randperm(n)[:7]  # the negative outscores the true caption on these
    neg = -img.clone()
    neg[wrong] = 2 * img[wrong]
    assert ev.swap_accuracy(img, img, neg) == pytest.approx(13 / 20)


class StubModel:
    """Features looked up by an id carried in the input: image id in pixel [0, 0, 0], text id in token 0."""

    def __init__(self, img, txt):
        self.img, self.txt = img, txt

    def encode_image(self, x, normalize=True):
        return self.img[x[:, 0, 0, 0].long()]

    def encode_text(self, t, normalize=True):
        return self.txt[t[:, 0]]


def test_evaluate_pairs_known_answer(one_rank):
    """Through evaluate_pairs: retrieval over all pairs (a repeated caption stays a query, as in OpenCLIP), the
    validation loss over batches of the given size, the swap set's answer is known."""
    from sparo_fast_training import evaluate as ev

    n = 12
    ranks = torch.randint(0, n - 1, (n,)).tolist()
    sim = sim_with_ranks(ranks)
    captions = [f"caption {i}" for i in range(n)]
    captions[7] = captions[3]  # a repeat: pair 7 is not a retrieval query
    negs = {1: 5.0, 4: -5.0, 9: -5.0, 10: 5.0}  # swap negatives scoring above (5) or below (-5) the truth
    txt = torch.cat([sim.T, torch.zeros(len(negs), n, dtype=torch.float64)])
    ids = {}
    for m, (i, score) in enumerate(negs.items()):
        txt[n + m, i] = score  # image i is e_i: its score with this negative
        ids[f"neg {i}"] = n + m
    samples = []
    for i in range(n):
        image = torch.zeros(3, 2, 2)
        image[0, 0, 0] = i
        meta = {"neg_caption": f"neg {i}"} if i in negs else {}
        samples.append({"index": i, "image": image, "tokens": torch.tensor([i]),
                        "caption": captions[i], "meta": meta})
    tok = lambda texts: torch.tensor([[ids[t]] for t in texts])  # noqa: E731
    model = StubModel(torch.eye(n, dtype=torch.float64), txt)
    res = ev.evaluate_pairs(model, samples, tok, 5, torch.device("cpu"), torch.zeros(3, 2, 2), 1, logit_scale=3.0)
    want = {**expected(ranks_of(sim), "image_to_text"), **expected(ranks_of(sim.T), "text_to_image")}
    for k, v in want.items():
        assert res[k] == pytest.approx(v), k
    assert res["num_samples"] == n
    assert res["swap_count"] == 4 and res["swap_accuracy"] == pytest.approx(0.5)
    assert res["clip_val_loss"] == pytest.approx(ev.validation_loss(torch.eye(n), sim.float(), 3.0, 5), rel=1e-5)
    assert res["clip_val_loss"] != pytest.approx(ev.validation_loss(torch.eye(n), sim.float(), 3.0, 10), rel=1e-3)


# ------------------------------------------------------------------------ plot_metrics


def fake_run(d, n_steps, seed):
    import json
    import random

    rng = random.Random(seed)
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, n_steps + 1):
            f.write(json.dumps({"kind": "train", "step": s, "time": 0.0, "epoch": 0, "loss": 5 / s + rng.random(),
                                "lr": 1e-3 * min(1, s / 3), "samples_per_s": 10.0}) + "\n")
            if s % 4 == 0:
                f.write(json.dumps({"kind": "eval", "step": s, "epoch": 0, "image_to_text_R@1": rng.random(),
                                    "val_loss": rng.random(), "retrieval_count": 60.0}) + "\n")
        f.write('{"kind": "train", "step": 99, "loss": 1.')  # a line cut short by a crash


def test_plot_metrics_of_two_runs(tmp_path):
    import subprocess
    import sys

    from sparo_fast_training import plot_metrics

    fake_run(tmp_path / "a", 12, 1)
    fake_run(tmp_path / "b", 8, 2)
    out = tmp_path / "cmp" / "plot.png"
    res = subprocess.run([sys.executable, "-m", "sparo_fast_training.plot_metrics", str(tmp_path / "a"),
                          str(tmp_path / "b"), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    runs = {p: plot_metrics.read_metrics(str(tmp_path / p)) for p in "ab"}
    assert plot_metrics.panels(runs) == [("train", "loss"), ("train", "lr"), ("eval", "image_to_text_R@1"),
                                         ("eval", "val_loss")]
    assert len(runs["a"]["train"]["loss"]) == 12 and len(runs["b"]["eval"]["val_loss"]) == 2
    bad = subprocess.run([sys.executable, "-m", "sparo_fast_training.plot_metrics", str(tmp_path / "nope"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no metrics.jsonl" in bad.stderr


# ------------------------------------------------------------------------ zero-shot known answers


class FeatureModel:
    """encode_image: the image tensor's first entries are the feature; encode_text: one-hot rows by token id."""

    def __init__(self, dim):
        self.dim = dim

    def encode_image(self, x, normalize=True):
        f = x.reshape(len(x), -1)[:, :self.dim].double()
        return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    def encode_text(self, t, normalize=True):
        return torch.nn.functional.one_hot(t[:, 0] % self.dim, self.dim).double()


def test_synthetic_zero_shot_known_answer(one_rank):
    """Colour and shape zero-shot through OpenCLIP's classifier builder: 3 of 5 colours and 2 of 5 shapes right."""
    from sparo_fast_training import evaluate as ev, synthetic

    colors, shapes = list(synthetic.COLORS), list(synthetic.SHAPES)
    dim = len(colors) + len(shapes)

    def tok(texts):
        ids = []
        for t in texts:
            words = [w.strip(".") for w in t.split()]
            ids.append([next((colors.index(w) for w in words if w in colors),
                             next((len(colors) + shapes.index(w) for w in words if w in shapes), 0))])
        return torch.tensor(ids)

    truth = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "diamond"), ("red", "square")]
    said = [("red", "square"), ("green", "square"), ("purple", "triangle"), ("yellow", "circle"), ("blue", "circle")]
    samples = []
    for i, ((c, s), (pc, ps)) in enumerate(zip(truth, said)):
        image = torch.zeros(3, 2, 2).reshape(-1)
        image[colors.index(pc)] = 1.0
        image[len(colors) + shapes.index(ps)] = 1.0
        samples.append({"index": i, "image": image.reshape(3, 2, 2), "tokens": torch.tensor([0]),
                        "caption": f"c{i}", "meta": {"color": c, "shape": s}})
    res = ev.evaluate_pairs(FeatureModel(dim), samples, tok, 4, torch.device("cpu"), torch.zeros(3, 2, 2), 1,
                            logit_scale=1.0)
    assert res["zeroshot_color_top1"] == pytest.approx(3 / 5)
    assert res["zeroshot_shape_top1"] == pytest.approx(2 / 5)


def test_imagenet_zero_shot_known_answer(one_rank, tmp_path, monkeypatch):
    """Four images of classes 0-3: right; right class second (top-5 only); right class last; right -> top-1 2/4,
    top-5 3/4. Each image's colour encodes its feature (class and behaviour); the classifier is OpenCLIP's."""
    import open_clip.zero_shot_metadata as meta
    from PIL import Image
    from torchvision import transforms

    from sparo_fast_training import evaluate as ev

    names = [f"class{c:04d}" for c in range(1000)]
    monkeypatch.setattr(meta, "IMAGENET_CLASSNAMES", names)
    monkeypatch.setattr(meta, "OPENAI_IMAGENET_TEMPLATES", meta.OPENAI_IMAGENET_TEMPLATES[:2])
    for c in range(1000):
        (tmp_path / f"n{c:05d}").mkdir()
    for c, kind in enumerate([0, 1, 2, 0]):
        Image.new("RGB", (4, 4), (c * 10 + kind, 0, 0)).save(tmp_path / f"n{c:05d}" / "a.png")

    class ImageNetStub(FeatureModel):
        def encode_image(self, x, normalize=True):
            code = (x[:, 0, 0, 0] * 255).round().long()
            f = torch.zeros(len(x), self.dim, dtype=torch.float64)
            for i, (c, kind) in enumerate(zip((code // 10).tolist(), (code % 10).tolist())):
                f[i, c] = {0: 1.0, 1: 0.5, 2: -0.1}[kind]
                if kind:
                    f[i, c + 1] = 1.0
            return f

    tok = lambda texts: torch.tensor([[int(t.split("class")[1][:4])] for t in texts])  # noqa: E731
    res = ev.imagenet_zero_shot(ImageNetStub(1000), tok, str(tmp_path), transforms.ToTensor(), batch_size=3,
                                workers=0, device=torch.device("cpu"), rank=0, world_size=1)
    assert res["imagenet_count"] == 4
    assert res["imagenet-zeroshot-val-top1"] == pytest.approx(2 / 4)
    assert res["imagenet-zeroshot-val-top5"] == pytest.approx(3 / 4)


def test_evaluation_matches_open_clip_train_evaluate(one_rank, tiny, tmp_path):
    """OpenCLIP's own ``open_clip_train.train.evaluate`` on the same model and pairs (our loader's decoded eval
    samples, batches of --batch-size in order) gives the same values under the same names."""
    from types import SimpleNamespace

    from open_clip_train.train import evaluate as oc_evaluate

    from sparo_fast_training import data, evaluate as ev, synthetic

    d = synthetic.ensure_synthetic(str(tmp_path), 10, 40, shard_size=32, log=lambda *_: None)
    model, pre_val, tok = tiny
    samples = data.load_eval_samples(data.expand_urls(d["val"]), pre_val, tok, 0, 1)
    bs = 16
    batches = [(torch.stack([s["image"] for s in samples[b:b + bs]]),
                torch.stack([s["tokens"] for s in samples[b:b + bs]])) for b in range(0, len(samples), bs)]

    class Loader(list):
        num_samples = len(samples)

    args = SimpleNamespace(device="cpu", precision="fp32", val_frequency=1, epochs=1, zeroshot_frequency=0,
                           distributed=False, horovod=False, save_logs=False, wandb=False, rank=0, local_rank=0,
                           batch_size=bs, accum_freq=1)
    with torch.no_grad():
        theirs = oc_evaluate(model, {"val": SimpleNamespace(dataloader=Loader(batches))}, 1, args, tokenizer=tok)
    ours = ev.evaluate_pairs(model, samples, tok, bs, torch.device("cpu"), torch.zeros(3, 64, 64), 32)
    shared = set(theirs) - {"epoch"}
    assert shared <= set(ours) and len(shared) == 12, sorted(theirs)
    for k in shared:
        assert ours[k] == pytest.approx(float(theirs[k]), rel=1e-5, abs=1e-6), k


def test_evaluation_schedule_is_open_clip_train_s():
    """At the end of epoch e (from 1): when the frequency divides e or e is the last epoch; frequency 0: never."""
    from sparo_fast_training.evaluator import due

    assert [e for e in range(1, 6) if due(2, e, 5)] == [2, 4, 5]
    assert [e for e in range(1, 6) if due(1, e, 5)] == [1, 2, 3, 4, 5]
    assert not any(due(0, e, 5) for e in range(1, 6))  # 0 = never, not even at the end
